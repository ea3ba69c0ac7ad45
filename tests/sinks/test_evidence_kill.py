"""Evidence that survives a kill: SIGKILL a writer in the middle of large batched writes, again and
again, restart the log each time, and read what `egress-agent audit` reads.

Linux may end a multi-page `write` early when a fatal signal arrives, so a batch can be cut inside a
record. After every kill the start-up repair must leave only whole records (the torn tail named in a
gap record), and both flow-log readers must read every record without refusing the file.
KILL_ROUNDS sets the number of kills (default 10 in the suite; the closing note quotes 200).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from agent.sinks.eventlog import EvidenceLog, Options
from agent.sources.flowlog.jsonl import read_jsonl

ROUNDS = int(os.environ.get("KILL_ROUNDS", "10"))

WRITER = """
import sys
from agent.sinks.eventlog import EvidenceLog, Options
log = EvidenceLog(Options(sys.argv[1], max_bytes=1 << 40))
flow = ('"flow":{"proto":"tcp","src":"10.0.0.1","sport":%d,"dst":"203.0.113.9","dport":443,"packets":1,'
        '"bytes":60,"first_seen":"2026-01-01T00:00:00Z"}')
body = lambda i: (b'{"time":"2026-01-01T00:00:01Z","event":"new","policy":"p","verdict":"violation",'
                  + (flow % (i % 60000 + 1)).encode() + b',"pad":"' + b"x" * 700 + b'"')
print("ready", flush=True)
i = 0
while True:  # batches of ~2.5 MB: many pages per write, so a kill can land inside one
    log.write_many([body(i + k) for k in range(3000)])
    i += 3000
"""


def test_sigkill_during_batched_writes_never_leaves_a_torn_record(tmp_path):
    path = tmp_path / "evidence.jsonl"
    rnd = random.Random(5)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    repaired = 0
    for _ in range(ROUNDS):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline() == b"ready\n"
        time.sleep(rnd.uniform(0.02, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if path.stat().st_size > 64 << 20:  # keep the file small: start over (a rotation, as it were)
            path.unlink()
            continue
        EvidenceLog(Options(str(path), max_bytes=1 << 40)).close()  # the next start's repair, then a stop
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        lines = raw.splitlines()
        recs = [json.loads(x) for x in lines]  # every line whole
        repaired += sum(1 for r in recs if r.get("event") == "gap" and "torn" in r)
        flows, stats = read_jsonl(str(path))
        assert stats.torn == 0 and stats.seq_holes == 0, stats.warnings
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    print(f"{ROUNDS} kills, {repaired} torn tails cut back at start-up and named in a gap record")
