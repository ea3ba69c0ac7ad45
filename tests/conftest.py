import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import build_asn_mmdb, build_city_mmdb  # noqa: E402


@pytest.fixture(scope="session")
def city_db(tmp_path_factory):
    return build_city_mmdb(tmp_path_factory.mktemp("geo") / "test-city.mmdb")


@pytest.fixture(scope="session")
def asn_db(tmp_path_factory):
    return build_asn_mmdb(tmp_path_factory.mktemp("geo") / "test-asn.mmdb")


@pytest.fixture
def cli(tmp_path):
    """Run `python -m agent ...` as a user would; returns CompletedProcess (text)."""

    def run(*args, cwd=None, timeout=120):
        env = dict(os.environ, COLUMNS="200")
        return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or REPO, env=env, timeout=timeout)

    return run


def have(tool):
    return shutil.which(tool) is not None


@pytest.fixture(params=["c", "python"])
def capture_walk(request, monkeypatch):
    """Run the test on the C walk of capture files and on the Python walk (skipped where unbuilt)."""
    from agent.sources.capfile import walk as pcap_walk

    if request.param == "c" and pcap_walk._c_walk is None:
        pytest.skip("C accelerator not built")
    monkeypatch.setitem(pcap_walk.WALK, "c", request.param == "c")
    return request.param
