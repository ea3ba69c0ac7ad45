"""Damaged ctnetlink messages through a sanitizer build of the C event reader (see test_sanitizer.py).

    python -m tests.fuzz.sanitized_ctnl SO_PATH CASES SEED

Loads SO_PATH as `agent.sources.conntrack._ctnl`, then decodes CASES damaged messages one by one and, in
datagrams of several, through a socket with `drain`; each must equal the Python decoder. Exit 0
when all agree, 1 on a disagreement; the sanitizers abort on their own.
"""

import random
import socket
import sys

from tests.fuzz.sanitized_run import load_as


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sources.conntrack._ctnl", so)
    from agent.sources.conntrack import table as C
    from tests.ctnl_messages import damage, random_entry

    assert C._ctnl is mod, "the sanitizer build was not the one loaded"
    from agent.enrich.scope import Scoper

    table = C.scope_table(Scoper(public_nets=["198.51.100.0/24", "2001:db8::/32"], local_nets=["192.0.2.0/24"]))
    rnd = random.Random(seed)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for i in range(cases):
        msg = damage(random_entry(rnd), rnd)
        want = C.decode_entry(msg, 16, len(msg)) if len(msg) >= 16 else None
        if mod.decode(msg, C.CtEntry) != want:
            print(f"case {i}: C and Python disagree on {msg.hex()}")
            return 1
        datagram = msg + random_entry(rnd) + damage(random_entry(rnd), rnd)
        a.send(datagram)
        got, n, status, _skipped = mod.drain(b.fileno(), 8, C.CtEntry, table if i % 2 else None)
        if n != 1 or status != 0 or not all(type(e) is C.CtEntry for _, e, _acc in got):
            print(f"case {i}: drain read {n} datagrams (status {status})")
            return 1
    print(f"all messages agree ({cases} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
