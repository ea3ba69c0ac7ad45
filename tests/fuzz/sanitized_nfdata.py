"""Flow export datagrams through a sanitizer build of the collector's C data-set reader (see test_sanitizer.py).

    python -m tests.fuzz.sanitized_nfdata SO_PATH CASES SEED

Loads SO_PATH as `agent.sources.netflow._nfdata`, then decodes CASES IPFIX and v9 exports of random
templates (random fields, and the shapes the C reader takes, shuffled) with random bodies, whole
and damaged, through the collector with the C reader and without it: records and counts must be
equal. Then random plans straight into `records` (fields outside the record, bad lengths): each
is refused with ValueError or read, never read out of bounds. Exit 0 when all agree, 1 otherwise;
the sanitizers abort on their own.
"""

import random
import struct
import sys

from tests.fuzz.sanitized_run import load_as

POOL = [(8, 4), (12, 4), (27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (6, 1), (6, 2), (2, 4), (2, 8), (1, 8), (1, 3),
        (152, 8), (153, 8), (150, 4), (151, 4), (154, 8), (155, 8), (156, 8), (157, 8), (22, 4), (21, 4), (10, 2),
        (14, 4), (61, 1), (99, 5), (23, 8), (24, 4), (85, 4), (86, 2), (160, 8), (7, 9), (8, 3), (34, 4)]
SHAPES = [[(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (2, 4), (1, 8), (152, 8), (153, 8)],
          [(27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (6, 2), (2, 8), (1, 4), (22, 4), (21, 4), (10, 4)],
          [(8, 4), (12, 4), (4, 1), (2, 8), (1, 8), (156, 8), (157, 8), (61, 1)]]


def _exports(fields, body: bytes) -> list[bytes]:
    spec = b"".join(struct.pack("!HH", *f) for f in fields)
    tmpl = struct.pack("!HH", 2, 8 + len(spec)) + struct.pack("!HH", 300, len(fields)) + spec
    data = struct.pack("!HH", 300, 4 + len(body)) + body
    ipfix = struct.pack("!HHIII", 10, 16 + len(tmpl) + len(data), 1_750_000_000, 0, 1) + tmpl + data
    v9sets = struct.pack("!HHHH", 0, 8 + len(spec), 300, len(fields)) + spec + data
    v9 = struct.pack("!HHIIII", 9, 2, 4_000_000_000, 1_750_000_000, 0, 0) + v9sets
    return [ipfix, v9]


def _damage(d: bytes, rnd: random.Random) -> bytes:
    b = bytearray(d)
    for _ in range(rnd.randint(1, 4)):
        if b and rnd.random() < 0.7:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        else:
            b = b[:rnd.randrange(len(b) + 1)]
    return bytes(b)


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sources.netflow._nfdata", so)
    from agent.sources.netflow import decode

    assert decode._nfdata is mod, "the sanitizer build was not the one loaded"
    rnd = random.Random(seed)
    in_c = 0
    for i in range(cases):
        shaped = rnd.random() < 0.5
        fields = list(rnd.choice(SHAPES)) if shaped else [rnd.choice(POOL) for _ in range(rnd.randint(1, 12))]
        rnd.shuffle(fields)
        size = sum(n for _f, n in fields)
        body = rnd.randbytes(size * rnd.randint(0, 5) + rnd.randint(0, 7))
        exports = _exports(fields, body)
        exports += [_damage(d, rnd) for d in exports]
        got = []
        rate = rnd.choice([None, 1, 3, 1 << 33])
        for use_c in (True, False):
            c = decode.Collector()
            c.C = use_c
            if rate is not None:
                c.sampling[("192.0.2.1", 0)] = c.sampling[("192.0.2.1", 1)] = rate
            recs = [r for d in exports for r in c.datagram(d, "192.0.2.1", 1_750_000_000.0)]
            got.append((recs, c.counts))
        if got[0] != got[1]:
            print(f"case {i}: the C reader and the Python one disagree on fields {fields}, body {body.hex()}")
            return 1
        in_c += bool(got[0][0]) and decode._plan(tuple((f, n, 0) for f, n in fields)) is not None
    refused = 0
    for _ in range(cases):
        alen = rnd.choice([4, 16])
        size = 2 * alen + rnd.randint(8, 40)
        slots = [(0, alen), (alen, alen)]  # a plan as _plan makes them, then one slot damaged (sometimes)
        for _ in range(mod.NSLOT - 2):
            n = rnd.randint(1, 8)
            slots.append((rnd.randint(2 * alen, size - n), n) if rnd.random() < 0.7 else (-1, 0))
        if rnd.random() < 0.4:
            slots[rnd.randrange(mod.NSLOT)] = (rnd.randint(-1, size + 8), rnd.randint(-2, 20))
        spec = tuple(x for slot in slots for x in slot)
        try:
            mod.records(rnd.randbytes(rnd.randint(0, 300)), size, spec, (rnd.randint(0, 2), rnd.randint(0, 2)),
                        decode.Record, "192.0.2.1", rnd.choice([None, 2]), rnd.randint(0, 1), 1.0, 5)
        except ValueError:
            refused += 1
    print(f"all exports agree ({cases} cases, {in_c} with records read in C; "
          f"{refused} of {cases} random plans refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
