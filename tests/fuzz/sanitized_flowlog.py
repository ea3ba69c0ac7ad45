"""Damaged JSON-lines flow logs through a sanitizer build of the C column reader (see test_sanitizer.py).

    python -m tests.fuzz.sanitized_flowlog SO_PATH CASES SEED

Loads SO_PATH as `agent.sources.flowlog._flowlog`, then reads CASES logs (well-formed lines written the ways
a writer may space them, with damaged bytes, cut lines and over-long values among them) with the C
reader and without it; the two must agree. Exit 0 when all agree, 1 on a disagreement; the
sanitizers abort on their own.
"""

import json
import random
import sys
import tempfile
from pathlib import Path

from tests.fuzz.sanitized_run import load_as

VALUES = {
    "proto": ["tcp", "udp", "TCP", 6, 17, 300, None, "x" * 70],
    "src": ["10.0.0.5", "fd00::5", "::ffff:10.0.0.5", "1.2.3", "", "1" * 80],
    "dst": ["203.0.113.9", "2001:db8::1", "::", "2001:db8::1.2.3.4", "x"],
    "sport": [0, 443, 65535, 65536, None, 10**19, 10**25],
    "dport": [443, 53, None],
    "packets": [None, 1, 2**63 - 1, 2**64],
    "bytes": [None, 0, 1500],
    "first_seen": ["2025-06-15T12:00:00Z", "2025-06-15T12:00:00.123456Z", "2025-02-29T00:00:00Z", "9" * 27,
                   "2025-06-15T12:00:00.123456Zx", None, 1750000000],
    "last_seen": ["2025-06-15T12:00:01Z", None],
    "source": [None, "pcap", "s" * 300],
    "hostname": [None, "api.example"],
    "hostname_source": [None, "sni"],
}


def _log(rnd: random.Random) -> bytes:
    lines = []
    for _ in range(rnd.randrange(1, 8)):
        keys = ["proto", "src", "dst"] + rnd.sample(sorted(set(VALUES) - {"proto", "src", "dst"}), rnd.randrange(8))
        rnd.shuffle(keys)
        obj = {k: rnd.choice(VALUES[k][:2] if rnd.random() < 0.7 else VALUES[k]) for k in keys}
        sep = rnd.choice([(",", ":"), (", ", ": "), (" ,\t", " :  ")])
        lines.append(json.dumps(obj, separators=sep).encode())
    data = bytearray(b"\n".join(lines) + b"\n")
    for _ in range(rnd.choice([0, 0, 1, 3])):  # damaged bytes
        data[rnd.randrange(len(data))] = rnd.choice(b'"\\{}[],:0 \x00\x80\xff\nx')
    if rnd.random() < 0.1:
        data = data[:rnd.randrange(len(data))]  # cut anywhere
    return bytes(data)


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sources.flowlog._flowlog", so)
    from agent.sources.flowlog import table as J

    assert J._c_columns is mod.columns, "the sanitizer build was not the one loaded"
    rnd = random.Random(seed)
    path = Path(tempfile.mkdtemp()) / "f.jsonl"
    taken = 0
    for i in range(cases):
        data = _log(rnd)
        path.write_bytes(data)
        mod.columns(data, rnd.choice([J.MAX_LINE, 40]))  # a short line limit too
        got = J.read_jsonl_table(str(path))
        J._c_columns = None
        want = J.read_jsonl_table(str(path))
        J._c_columns = mod.columns
        if (got is None) != (want is None) or (got is not None and got[0].flows() != want[0].flows()):
            print(f"case {i}: C and Python disagree on {data!r}")
            return 1
        taken += mod.columns(data, J.MAX_LINE) is not None
    print(f"all logs agree ({cases} cases, {taken} read in C)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
