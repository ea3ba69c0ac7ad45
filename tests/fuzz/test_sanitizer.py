"""The C accelerator built with AddressSanitizer + UndefinedBehaviorSanitizer, run over the fuzz corpus.

Skipped (with the reason) where gcc or its sanitizer runtimes are missing. Budget: FUZZ_EXAMPLES
mutations (default 300) besides the seeds and their truncations at every record boundary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def _runtime(name: str) -> str | None:
    r = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if os.path.isabs(p) and os.path.exists(p) else None


def _sanitized_run(tmp_path, source: str, runner: str, cases: int, seed: int) -> str:
    """Build `source` with ASan + UBSan, run `python -m RUNNER SO CASES SEED` with the runtime
    preloaded, and return its output; the sanitizers abort the run on any error they see."""
    asan = _runtime("libasan.so")
    if not asan or not _runtime("libubsan.so"):
        pytest.skip("gcc's AddressSanitizer/UBSan runtimes (libasan, libubsan) are not installed")
    so = tmp_path / (Path(source).stem + "_sanitized.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-I", sysconfig.get_paths()["include"], str(REPO / source), "-o", str(so)],
                   check=True, capture_output=True)
    env = dict(os.environ, LD_PRELOAD=asan, PYTHONPATH=str(REPO),
               PYTHONMALLOC="malloc",  # every allocation through malloc, so ASan puts redzones around buffers
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99:verify_asan_link_order=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=98")
    r = subprocess.run([sys.executable, "-m", runner, str(so), str(cases), str(seed)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = r.stderr[-4000:]
    assert r.returncode == 0, report
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, report
    return r.stdout


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_walk_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sources/capfile/_walk.c", "tests.fuzz.sanitized_run", EXAMPLES, 7)
    assert "all paths agree" in out


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_conntrack_reader_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sources/conntrack/_ctnl.c", "tests.fuzz.sanitized_ctnl", EXAMPLES * 20, 11)
    assert "all messages agree" in out


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_flow_log_reader_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sources/flowlog/_flowlog.c", "tests.fuzz.sanitized_flowlog", EXAMPLES, 13)
    assert "all logs agree" in out and " 0 read in C" not in out


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_evidence_records_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sinks/_evidence.c", "tests.fuzz.sanitized_evidence", EXAMPLES * 10, 17)
    assert "all records agree" in out and " 0 written in C" not in out


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_flow_export_reader_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sources/netflow/_nfdata.c", "tests.fuzz.sanitized_nfdata", EXAMPLES * 3, 19)
    assert "all exports agree" in out and " 0 with records read in C" not in out


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_c_connection_table_under_asan_and_ubsan(tmp_path):
    out = _sanitized_run(tmp_path, "agent/sources/netflow/_conntab.c", "tests.fuzz.sanitized_conntab", EXAMPLES, 23)
    assert "all streams agree" in out
