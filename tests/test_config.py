import argparse
import json

import pytest

from agent.config import load_config, with_flags
from agent.errors import UserError


def test_every_config_problem_with_line(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("listen: nope\nsampling: {one_in: 0}\nsource: {type: pcap}\nbogus: 1\n")
    with pytest.raises(UserError) as e:
        load_config(str(p))
    text = str(e.value)
    assert f"{p}:1: listen:" in text and f"{p}:2: sampling.one_in:" in text
    assert f"{p}:3: source.type:" in text and "bogus" in text
    assert len(e.value.problems) == 4


def test_flags_override_file(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text(json.dumps({"listen": "127.0.0.1:1234", "sampling": {"one_in": 5}}))
    args = argparse.Namespace(listen="127.0.0.1:9999", sample=2, netns="x", policies=None, geoip_db=[],
                              local_net=[], public_net=[], evidence=None, enable_conntrack=True)
    cfg = with_flags(load_config(str(p)), args)
    assert cfg.listen_addr() == ("127.0.0.1", 9999) and cfg.sampling["one_in"] == 2
    assert cfg.source == {"netns": "x", "enable": True}


def test_run_with_bad_config_exits_2(cli, tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("queue_size: -1\n")
    r = cli("run", "--config", p)
    assert r.returncode == 2 and "queue_size" in r.stderr and "Traceback" not in r.stderr
