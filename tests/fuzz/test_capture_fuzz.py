"""Differential fuzzing of the capture reader: C walk vs Python walk vs the plain reference.

Short budget by default (CI); the long run is `FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz -q`.
A disagreement or an exception other than UserError fails with the case saved to a file; such a
case becomes a regression folder in tests/cases/.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import UserError
from agent.sources.capfile import walk as pcap_mod
from agent.sources.capfile.reader import read_capture
from tests.fuzz.corpus import mutate, records, reference_read, seeds

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return seeds(tmp_path_factory.mktemp("seeds"))


def all_paths(path: str) -> dict:
    out = {}
    modes = ["python"] + (["c"] if pcap_mod._c_walk is not None else [])
    saved = pcap_mod.WALK["c"]
    try:
        for mode in modes:
            pcap_mod.WALK["c"] = mode == "c"
            try:
                cap = read_capture(path)
            except UserError:
                out[mode] = "UserError"
                continue
            flows: dict = {}  # per 5-tuple, over its connections (the reference knows no idle timeouts)
            parts = []
            for f, h in zip(cap.flows, cap.table.hints.tolist(), strict=True):  # h: opener hints
                row = flows.setdefault((f.proto, f.src, f.sport, f.dst, f.dport), [0, 0, 0])
                row[0], row[1], row[2] = row[0] + f.packets, row[1] + f.bytes, row[2] | h
                parts.append((f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes, f.first_seen, f.last_seen))
            out[mode] = (flows, cap.stats.packets, cap.stats.malformed)
            out[f"{mode} parts"] = sorted(parts)  # how idle gaps cut each 5-tuple: the same on both walks
    finally:
        pcap_mod.WALK["c"] = saved
    out["reference"] = reference_read(path)
    return out


def check(data: bytes, where, name: str):
    path = where / "case.bin"
    path.write_bytes(data)
    got = all_paths(str(path))
    parts = [got.pop(k) for k in ("python parts", "c parts") if k in got]
    first = next(iter(got.values()))
    if not all(v == first for v in got.values()) or parts[1:] and parts[0] != parts[1]:
        keep = where / f"disagree-{name}-{random.randrange(1 << 30)}.bin"
        keep.write_bytes(data)
        pytest.fail(f"paths disagree on a mutation of {name} (saved as {keep}): " +
                    "; ".join(f"{k}: {v if isinstance(v, str) else (len(v[0]), v[1], v[2])}" for k, v in got.items()))
    return got


def test_seeds_agree(corpus, tmp_path):
    for name, data in corpus.items():
        got = check(data, tmp_path, name)
        assert got["reference"] != "UserError" and got["reference"][1] > 0, name


def test_truncation_at_every_record_boundary(corpus, tmp_path):
    for name, data in corpus.items():
        _fmt, _e, offs = records(data)
        for off in offs:
            for cut in (off - 1, off, off + 1, off + 11, off + 12, off + 16, off + 17):
                if 0 < cut < len(data):
                    check(data[:cut], tmp_path, name)


@SETTINGS
@given(st.data())
def test_structure_aware_mutations_agree(corpus, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(corpus)), label="seed")
    rnd = data.draw(st.randoms(use_true_random=False), label="rnd")
    check(mutate(corpus[name], rnd), tmp_path_factory.mktemp("m", numbered=True), name)
