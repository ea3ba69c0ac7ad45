"""Random streams of operations on the collector's connection table, and a run of one stream
through both twins (conntable.ConnTable and the C `_conntab.Table`), shared by
tests/sources/test_conntable.py and the sanitizer run (sanitized_conntab.py).

A stream mixes read rounds (groups of records from several exporters, sites and scopes, refused
ones among them), sweeps and reconfigurations; the records reuse a few endpoints so that replies,
repeats, idle gaps, evictions, biflows, counters past 64 bits and addresses that carry IPv4 ones
(Teredo, NAT64-local, mapped) all come up.
"""

from __future__ import annotations

import random

from agent.enrich.scope import Scoper
from agent.sources.netflow.decode import Record
from agent.wire.decode import HINT_SYN

SCOPERS = [Scoper(public_nets=("203.0.113.0/24", "198.51.100.0/24", "2001:db8:1::/48")),
           Scoper(public_nets=("203.0.113.0/24", "2001:db8::/32"), local_nets=("203.0.113.128/25", "192.0.2.0/24"))]
ADDRS = ["192.0.2.1", "192.0.2.77", "10.1.2.3", "203.0.113.5", "203.0.113.200", "198.51.100.9", "2001:db8:1::5",
         "2001:db8:2::9", "fd00::1", "2001:0:1:2:3:4:34ff:8efa", "64:ff9b:1::cb00:7105", "::ffff:203.0.113.7",
         "127.0.0.1"]
PORTS = [0, 53, 80, 443, 3306, 8080, 40000, 40001, 51820, 65535]
PROTOS = [6, 6, 6, 17, 17, 1, 58, 132, 47]
EXPORTERS = ["192.0.2.254", "192.0.2.253", "2001:db8::fe"]
SITES = ["edge", "dc", "other"]
FLAGS = [0, 0x02, 0x12, 0x10, 0x11, 0x1B, HINT_SYN | 0x02, HINT_SYN, HINT_SYN | 0x12, 0x2FF]


def record(rnd: random.Random, t: float) -> Record:
    first = t + rnd.choice([0, 0, 0.5, 1, 30, 200, 500]) + rnd.choice([0, 0, 0.25, rnd.random()])
    pk = rnd.randrange(1, 100) * (1 << 64 if rnd.random() < 0.05 else 1)
    biflow = rnd.random() < 0.2
    return Record(rnd.choice(PROTOS), rnd.choice(ADDRS), rnd.choice(PORTS), rnd.choice(ADDRS), rnd.choice(PORTS), pk,
                  pk * rnd.randrange(40, 1500), first, first + rnd.choice([0, 0, 1, 10, 100]), rnd.choice(FLAGS),
                  rnd.choice(EXPORTERS), rnd.choice([None, 1, 100]), None, rnd.choice([None, 3]),
                  rnd.choice([None, 4]), rnd.randrange(0, 50) if biflow else None,
                  rnd.randrange(0, 5000) if biflow else None, rnd.choice([0, 0x12, 0x10]) if biflow else 0)


def stream(rnd: random.Random, n: int) -> list[tuple]:
    """n operations: ("feed", groups), ("sweep", now) or ("configure", scopers, inbound)."""
    t, out = 1_750_000_000.0, []
    for _ in range(n):
        x = rnd.random()
        if x < 0.8:
            out.append(("feed", [([record(rnd, t) for _ in range(rnd.randint(0, 8))], rnd.choice(SITES),
                                  rnd.choice([0, 0, 1, -1])) for _ in range(rnd.randint(0, 4))]))
            t += rnd.choice([0, 1, 50, 400])
        elif x < 0.93:
            out.append(("sweep", t + rnd.choice([0, 100, 119, 121, 359, 361, 400, 1200, float("inf")])))
        else:
            out.append(("configure", rnd.sample(SCOPERS, 2), rnd.random() < 0.5))
    return out


def run(table, ops: list[tuple]) -> list:
    """What a table answers to each operation: (tally, items, size, last id)."""
    out = []
    for op in ops:
        items: list = []
        if op[0] == "feed":
            tally = table.feed(op[1], items)
        elif op[0] == "sweep":
            tally = table.sweep(op[1], items)
        else:
            tally = table.configure(op[1], op[2])
        out.append((tally, items, len(table), table.next_id))
    return out


def first_difference(ops: list[tuple], max_connections: int, inbound: bool) -> str | None:
    """None when both twins answer every operation alike; else where and how they differ."""
    from agent.sources.netflow.conntable import make_table

    got = [run(make_table("netflow", SCOPERS, inbound, 1 << 40, c, max_connections), ops) for c in (True, False)]
    for i, (a, b) in enumerate(zip(*got, strict=True)):
        if a != b:
            return f"operation {i} {ops[i]!r}:\n  C:      {a!r}\n  Python: {b!r}"
    return None
