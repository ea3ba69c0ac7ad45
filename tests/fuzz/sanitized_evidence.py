"""Random record parts through a sanitizer build of the evidence record writer (see test_sanitizer.py).

    python -m tests.fuzz.sanitized_evidence SO_PATH CASES SEED

Loads SO_PATH as `agent.sinks._evidence` and writes CASES flows' records with it and with its
Python twin (`FastLane._py_records`): parts of every length (empty too), each message form, long
process members, times at and beyond the edges of the range. They must agree byte for byte
wherever the C writer takes the flow. Then the evidence log's numbered lines (`lines`) against
eventlog.py_numbered_lines. Exit 0 when all agree, 1 on a disagreement.
"""

import random
import sys
from types import SimpleNamespace

from tests.fuzz.sanitized_run import load_as


def _bytes(rnd: random.Random, most: int) -> bytes:
    return bytes(rnd.choice(b'ab"\\{}:, 09\xc3\xa9') for _ in range(rnd.choice([0, 1, 5, most])))


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sinks._evidence", so)
    from agent.flow import iso_time
    from agent.judge.fastlane import FastLane
    from agent.sources.conntrack.table import CtEntry

    rnd = random.Random(seed)
    taken = 0
    for i in range(cases):
        parts = tuple((_bytes(rnd, 300), rnd.randrange(3), _bytes(rnd, 200), _bytes(rnd, 300), _bytes(rnd, 900),
                       _bytes(rnd, 100)) for _ in range(rnd.randrange(4)))
        src = rnd.choice(["10.0.0.5", "fd00::5", "2001:db8:1234:5678:9abc:def0:1234:5678", "255.255.255.255"])
        e = CtEntry(rnd.getrandbits(32), rnd.choice([6, 17, 132]), src, rnd.randrange(65536), rnd.choice(
            ["203.0.113.9", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]), rnd.randrange(65536),
            rnd.getrandbits(63), rnd.getrandbits(63), 0, None, None)
        first = rnd.choice([1750000000.0, 1750000000.0000005, 0.0, 253402300798.0, 253402300799.5, -1.0,
                            rnd.uniform(0, 4e9)])
        last = rnd.choice([first, first + 1.5, 1e12])
        extra = rnd.choice([None, b"", b',"nat":{"dst":"192.0.2.1","src":null}'])
        process = rnd.choice([None, b'{"pid":7}', b'{"comm":"' + b"x" * rnd.choice([10, 5000]) + b'"}'])
        # a collector connection's members (13th argument), or conntrack's source (none given)
        conn = rnd.choice([None, b'"opened_by":"port","packets_reply":3,"source":"netflow:paris"', b"",
                           b'"source":"' + b"y" * rnd.choice([10, 5000]) + b'"'])
        out: list = []
        args = (out, parts, b',"event":"new",', b'"2025-06-15T15:06:40.123456Z"', e, e.packets, e.bytes, first, last,
                b'"tcp"', extra, process)
        ok = mod.records(*args, conn) if conn is not None or rnd.random() < 0.5 else mod.records(*args)
        if not ok:
            if out:
                print(f"case {i}: refused, yet wrote records")
                return 1
            continue
        if iso_time(first) is None or first < 0:
            print(f"case {i}: took a time outside the range")
            return 1
        twin = SimpleNamespace(d=SimpleNamespace(_records=[]))
        FastLane._py_records(twin, parts, b',"event":"new",', b'"2025-06-15T15:06:40.123456Z"', e, e.packets,
                             e.bytes, first, last, b'"tcp"', extra, process, conn)
        if out != twin.d._records:
            print(f"case {i}: C and Python disagree:\n{out!r}\n{twin.d._records!r}")
            return 1
        taken += 1
    from agent.sinks.eventlog import py_numbered_lines

    for i in range(cases):  # the log's numbered lines: any room, any start, numbers of any width
        bodies = [_bytes(rnd, 900) for _ in range(rnd.randrange(6))]
        at = (bodies, rnd.randrange(8), rnd.choice([0, 9, 10**17, rnd.getrandbits(62)]), rnd.randrange(-3, 3000))
        if mod.lines(*at) != py_numbered_lines(*at):
            print(f"case {i}: numbered lines differ for {at!r}")
            return 1
    print(f"all records agree ({cases} cases, {taken} written in C; numbered lines too)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
