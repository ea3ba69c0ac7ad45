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


def test_every_option_has_a_flag_and_flags_are_validated(tmp_path):
    from agent.cli import build_parser
    from agent.config import SCHEMA

    args = build_parser().parse_args(["run", "--rate-limit", "5", "--queue-size", "32", "--rcvbuf", "65536",
                                      "--no-attribution", "--geoip-check-interval", "2", "--reload-check-interval",
                                      "3", "--evidence-max-bytes", "8192", "--evidence-backups", "2",
                                      "--evidence-fsync", "--sample", "4", "--evidence", str(tmp_path / "e.jsonl"),
                                      "--web-config", "/etc/w.yml", "--source", "conntrack", "--source", "capture",
                                      "--interface", "eth0", "--no-host-addresses", "--recipients", "/etc/r",
                                      "--source", "netflow", "--source", "sflow",
                                      "--netflow-listen", "0.0.0.0:2055", "--sflow-listen", "[::]:6343",
                                      "--unknown-exporters", "refuse", "--enforce", "dry-run",
                                      "--management-net", "198.51.100.0/28"])
    cfg = with_flags(load_config(None), args)
    assert cfg.sampling == {"per_destination_per_second": 5, "one_in": 4} and cfg.queue_size == 32
    assert cfg.source["rcvbuf"] == 65536 and cfg.attribution is False and cfg.web_config == "/etc/w.yml"
    assert (cfg.geoip_check_interval, cfg.reload_check_interval) == (2, 3)
    assert cfg.evidence == {"path": str(tmp_path / "e.jsonl"), "max_bytes": 8192, "backups": 2, "fsync": True}
    assert (cfg.sources, cfg.capture["interfaces"], cfg.host_addresses) == (
        ("conntrack", "capture", "netflow", "sflow"), ["eth0"], False)
    covered = {"policies", "geoip_databases", "geoip_check_interval", "local_nets", "public_nets", "listen",
               "evidence", "source", "sampling", "attribution", "queue_size", "reload_check_interval", "web_config",
               "sources", "capture", "host_addresses", "recipients", "netflow", "sflow", "unknown_exporters",
               "enforce", "enforcement"}
    assert cfg.netflow == {"listen": ["0.0.0.0:2055"]} and cfg.sflow == {"listen": ["[::]:6343"]}
    assert cfg.unknown_exporters == "refuse" and cfg.enforce == "dry-run"
    assert cfg.enforcement == {"management_nets": ["198.51.100.0/28"]}  # the rest of enforcement: the file's
    # `exporters` is a list of mappings (address, site, local_nets): the config file's alone
    assert set(SCHEMA["properties"]) == covered | {"exporters"}
    bad = build_parser().parse_args(["run", "--queue-size", "1"])
    with pytest.raises(UserError, match="queue_size"):
        with_flags(load_config(None), bad)


def test_exporters_are_checked_with_their_line(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("sources: [netflow]\nexporters:\n  - {address: 192.0.2.1, site: paris}\n"
                 "  - {address: router-7, site: lyon, local_nets: [10.2.0.0/16, 10.300.0.0/16]}\n"
                 "  - {site: nowhere}\nunknown_exporters: maybe\n")
    with pytest.raises(UserError) as e:
        load_config(str(p))
    text = "\n".join(e.value.problems)
    assert f"{p}:4: exporters[1].address: 'router-7' is not an IP address" in text
    assert f"{p}:4: exporters[1].local_nets[1]: '10.300.0.0/16' is not a network" in text
    assert f"{p}:5: exporters[2]: 'address' is a required property" in text
    assert f"{p}:6: unknown_exporters:" in text and len(e.value.problems) == 4
