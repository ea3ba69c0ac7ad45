"""Random operation streams through a sanitizer build of the collector's C connection table (see
test_sanitizer.py).

    python -m tests.fuzz.sanitized_conntab SO_PATH CASES SEED

Loads SO_PATH as `agent.sources.netflow._conntab`, then runs CASES streams
(tests/fuzz/conntable_streams.py) through it and through the reference table, with bounds from one
connection up: every answer must be equal. Then inputs the contract refuses (records that are not
Records, groups of the wrong shape, scopes of the wrong length) must raise, never read out of
bounds. Exit 0 when all agree, 1 otherwise; the sanitizers abort on their own.
"""

import random
import sys

from tests.fuzz.sanitized_run import load_as


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sources.netflow._conntab", so)
    from agent.sources.netflow import conntable
    from tests.fuzz.conntable_streams import SCOPERS, first_difference, stream

    assert conntable._conntab is mod, "the sanitizer build was not the one loaded"
    rnd = random.Random(seed)
    for i in range(cases):
        ops = stream(rnd, rnd.randint(1, 60))
        diff = first_difference(ops, rnd.choice([1, 2, 5, 64, 1 << 18]), rnd.random() < 0.5)
        if diff:
            print(f"case {i}: {diff}")
            return 1
    t = conntable.make_table("netflow", SCOPERS, True, 0)
    refused = 0
    for bad in ([("x", "edge", 0)], [([(1, 2)], "edge", 0)], [([], "edge")], [([None], "edge", 0)],
                [([conntable.NetflowEntry(*range(26))], "edge", 5)]):
        try:
            t.feed(bad, [])
        except (TypeError, ValueError, IndexError, OverflowError):
            refused += 1
    for bad in ([(b"\0" * 3, b"\1", b"", b"")], [(b"", b"", b"\0" * 16, b"")], [("", b"", b"", b"")]):
        try:
            t._t.configure(bad, True)
        except TypeError:
            refused += 1
    print(f"all streams agree ({cases} cases); {refused} of 8 malformed inputs refused")
    return 0 if refused == 8 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
