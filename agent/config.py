"""Daemon configuration: YAML, validated against a JSON Schema once, every problem reported.

Example (every key optional; flags of `egress-agent run` override):

    policies: /etc/egress-agent/policies
    recipients: /etc/egress-agent/recipients   # recipient register (optional)
    geoip_databases: [/var/lib/GeoIP/GeoLite2-City.mmdb, /var/lib/GeoIP/GeoLite2-ASN.mmdb]
    geoip_check_interval: 60        # seconds between checks for a new database file
    local_nets: [10.0.0.0/8]        # this side of the border, besides non-public ranges
    public_nets: []                 # treat as public although IANA reserves them
    listen: 127.0.0.1:9807          # Prometheus metrics
    web_config: null                # exporter-toolkit web-config.yml: TLS and basic auth for /metrics
    evidence: {path: /var/lib/egress-agent/evidence.jsonl, max_bytes: 104857600, backups: 10, fsync: false}
    source: {type: conntrack, netns: null, enable: false, rcvbuf: 8388608,
             kernel_filter: true,          # drop non-egress events in the kernel (socket BPF filter)
             accounting_interval: 1}       # seconds between readings of the kernel's flow counter
    sources: [conntrack]            # add capture: names on flows from DNS, TLS and QUIC (agent/sources/capture.py);
                                    # netflow, sflow: a collector of routers' exports (agent/sources/netflow/source.py)
    netflow: {listen: ["0.0.0.0:2055"], rcvbuf: 33554432, workers: 1}   # workers > 1: SO_REUSEPORT processes
    sflow: {listen: ["0.0.0.0:6343"]}
    exporters: [{address: 192.0.2.1, site: paris, local_nets: [10.1.0.0/16]}]
    unknown_exporters: judge        # or refuse
    enforce: observe                # dry-run: count what policies with enforce: dry-run would refuse;
                                    # refuse: also refuse what policies with enforce: refuse forbid (agent/enforce)
    enforcement: {management_nets: [198.51.100.0/28], ntp_servers: [], scrapers: [], forward: false,
                  fail: open, poll_interval: 1, log_per_second: 5, seen_timeout: 300}
    capture: {interfaces: [], tls_ports: [443], name_wait: 0.5, dns_grace: 30}
    host_addresses: true            # the host's own addresses are local, even public ones (pyroute2)
    sampling: {one_in: 1, per_destination_per_second: 0}
    attribution: true
    queue_size: 65536
    reload_check_interval: 0        # seconds; > 0 reloads when the policy files or config change
                                    # (a Kubernetes ConfigMap update), as SIGHUP does
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent import yamlio
from agent.errors import UserError
from agent.schemacheck import schema_errors

_LISTEN = r"^(\[[0-9a-fA-F:.]+\]|[^:\s]+):[0-9]{1,5}$"
_COLLECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "listen": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": _LISTEN}},
    "rcvbuf": {"type": "integer", "minimum": 1024},
    "workers": {"type": "integer", "minimum": 1, "maximum": 64}}}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policies": {"type": "string"},
        "recipients": {"type": ["string", "null"]},
        "geoip_databases": {"type": "array", "items": {"type": "string"}},
        "geoip_check_interval": {"type": "number", "minimum": 0.1},
        "local_nets": {"type": "array", "items": {"type": "string"}},
        "public_nets": {"type": "array", "items": {"type": "string"}},
        "listen": {"type": "string", "pattern": r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):[0-9]{1,5}$"},
        "web_config": {"type": ["string", "null"]},
        "evidence": {"type": "object", "additionalProperties": False, "properties": {
            "path": {"type": "string"}, "max_bytes": {"type": "integer", "minimum": 4096},
            "backups": {"type": "integer", "minimum": 0, "maximum": 1000}, "fsync": {"type": "boolean"}}},
        "source": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"enum": ["conntrack"]}, "netns": {"type": ["string", "null"]}, "enable": {"type": "boolean"},
            "rcvbuf": {"type": "integer", "minimum": 1024}, "kernel_filter": {"type": "boolean"},
            "accounting_interval": {"type": "number", "minimum": 0.2, "maximum": 3600}}},
        "sources": {"type": "array", "minItems": 1, "uniqueItems": True,
                    "items": {"enum": ["conntrack", "capture", "netflow", "sflow"]}},
        "netflow": _COLLECTOR,
        "sflow": _COLLECTOR,
        "exporters": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                 "required": ["address"], "properties": {
                                                     "address": {"type": "string"},
                                                     "site": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
                                                     "local_nets": {"type": "array", "items": {"type": "string"}}}}},
        "unknown_exporters": {"enum": ["judge", "refuse"]},
        "enforce": {"enum": ["observe", "dry-run", "refuse"]},
        "enforcement": {"type": "object", "additionalProperties": False, "properties": {
            "management_nets": {"type": "array", "items": {"type": "string"}},
            "ntp_servers": {"type": "array", "items": {"type": "string"}},
            "scrapers": {"type": "array", "items": {"type": "string"}},
            "forward": {"type": "boolean"}, "fail": {"enum": ["open", "closed"]},
            "poll_interval": {"type": "number", "minimum": 0.1, "maximum": 60},
            "log_per_second": {"type": "number", "minimum": 0},
            "seen_timeout": {"type": "integer", "minimum": 1, "maximum": 86400},
            "resolv_conf": {"type": "string"}, "name_ttl_floor": {"type": "integer", "minimum": 1}}},
        "capture": {"type": "object", "additionalProperties": False, "properties": {
            "interfaces": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "tls_ports": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "name_wait": {"type": "number", "minimum": 0, "maximum": 10},
            "dns_grace": {"type": "number", "minimum": 0, "maximum": 86400},
            "dns_max_ttl": {"type": "integer", "minimum": 0, "maximum": 86400},
            "resolvers": {"type": "array", "items": {"type": "string", "minLength": 1}}}},
        "host_addresses": {"type": "boolean"},
        "sampling": {"type": "object", "additionalProperties": False, "properties": {
            "one_in": {"type": "integer", "minimum": 1},
            "per_destination_per_second": {"type": "number", "minimum": 0}}},
        "attribution": {"type": "boolean"},
        "queue_size": {"type": "integer", "minimum": 16},
        "reload_check_interval": {"type": "number", "minimum": 0},
    },
}

DEFAULT_LISTEN = "127.0.0.1:9807"


@dataclass(frozen=True)
class Config:
    policies: str | None = None
    recipients: str | None = None
    geoip_databases: tuple[str, ...] = ()
    geoip_check_interval: float = 60.0
    local_nets: tuple[str, ...] = ()
    public_nets: tuple[str, ...] = ()
    listen: str = DEFAULT_LISTEN
    web_config: str | None = None
    evidence: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ("conntrack",)
    capture: dict = field(default_factory=dict)
    host_addresses: bool = True
    sampling: dict = field(default_factory=dict)
    attribution: bool = True
    queue_size: int = 65536
    reload_check_interval: float = 0.0
    netflow: dict = field(default_factory=dict)
    sflow: dict = field(default_factory=dict)
    exporters: tuple = ()
    unknown_exporters: str = "judge"
    enforce: str = "observe"  # the host's switch: caps each policy's `enforce` (observe < dry-run < refuse)
    enforcement: dict = field(default_factory=dict)
    file: str | None = None

    def exporter_nets(self) -> tuple[str, ...]:
        """Every exporter's own local_nets: local to the engine too, so it sees what the collector judged."""
        return tuple(n for e in self.exporters for n in (e.get("local_nets") or ()))

    @property
    def evidence_path(self) -> str:
        base = os.environ.get("STATE_DIRECTORY", ".").split(":")[0]
        return self.evidence.get("path") or str(Path(base) / "evidence.jsonl")

    def listen_addr(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def load_config(path: str | None) -> Config:
    if not path:
        return Config()
    data, lines, _ = yamlio.load_file(path, "config")
    data = data or {}
    problems = []
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config is a mapping of settings")
    for err in sorted(schema_errors(SCHEMA, data), key=lambda e: list(map(str, e.path))):
        line = yamlio.line_of(lines, err.absolute_path)
        problems.append(f"{path}:{line or '?'}: {yamlio.dotted(err.absolute_path)}: {err.message}")
    problems += [f"{path}:{yamlio.line_of(lines, ('exporters', i)) or '?'}: {p}"
                 for i, p in _exporter_problems(data.get("exporters"))]
    problems += [f"{path}:{yamlio.line_of(lines, ('enforcement', k, i)) or '?'}: {p}"
                 for k, i, p in _enforcement_problems(data.get("enforcement"))]
    if problems:
        raise UserError(f"{len(problems)} problem(s) in config {path}", problems)
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return Config(**data, file=path)


def _exporter_problems(exporters) -> list[tuple[int, str]]:
    """(index, problem) for exporter addresses and networks that are not IP addresses / networks."""
    import ipaddress

    out = []
    for i, e in enumerate(exporters if isinstance(exporters, list | tuple) else ()):
        if not isinstance(e, dict):
            continue
        try:
            if "address" in e:  # a missing one is the schema's to say
                ipaddress.ip_address(str(e["address"]))
        except ValueError:
            out.append((i, f"exporters[{i}].address: '{e.get('address')}' is not an IP address"))
        for j, n in enumerate(e.get("local_nets") or () if isinstance(e.get("local_nets"), list) else ()):
            try:
                ipaddress.ip_network(str(n), strict=False)
            except ValueError:
                out.append((i, f"exporters[{i}].local_nets[{j}]: '{n}' is not a network"))
    return out


def _enforcement_problems(opts) -> list[tuple[str, int, str]]:
    """Networks enforcement must never refuse that are not networks: a typo there would lock the host out."""
    import ipaddress

    out = []
    for key in ("management_nets", "scrapers"):
        items = opts.get(key) if isinstance(opts, dict) else None
        for i, n in enumerate(items if isinstance(items, list) else ()):
            try:
                ipaddress.ip_network(str(n), strict=False)
            except ValueError:
                out.append((key, i, f"enforcement.{key}[{i}]: '{n}' is not an address or network"))
    return out


def _as_dict(cfg: Config) -> dict:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "file"}
    return {k: v for k, v in d.items() if v is not None}


def with_flags(cfg: Config, args) -> Config:
    """Flags win over the file."""
    changes = {}
    if getattr(args, "policies", None):
        changes["policies"] = args.policies
    if getattr(args, "recipients", None):
        changes["recipients"] = args.recipients
    if getattr(args, "geoip_db", None):
        changes["geoip_databases"] = tuple(args.geoip_db)
    if getattr(args, "local_net", None):
        changes["local_nets"] = tuple(args.local_net)
    if getattr(args, "public_net", None):
        changes["public_nets"] = tuple(args.public_net)
    if getattr(args, "listen", None):
        changes["listen"] = args.listen
    if getattr(args, "web_config", None):
        changes["web_config"] = args.web_config
    if getattr(args, "evidence", None):
        changes["evidence"] = {**cfg.evidence, "path": args.evidence}
    if getattr(args, "netns", None):
        changes["source"] = {**cfg.source, "netns": args.netns}
    if getattr(args, "enable_conntrack", None):
        changes["source"] = {**changes.get("source", cfg.source), "enable": True}
    for flag, key in (("queue_size", "queue_size"), ("geoip_check_interval", "geoip_check_interval"),
                      ("reload_check_interval", "reload_check_interval")):
        if getattr(args, flag, None) is not None:
            changes[key] = getattr(args, flag)
    if getattr(args, "source", None):
        changes["sources"] = tuple(dict.fromkeys(args.source))
    if getattr(args, "enforce", None):
        changes["enforce"] = args.enforce
    if getattr(args, "management_net", None):
        changes["enforcement"] = {**cfg.enforcement, "management_nets": list(args.management_net)}
    if getattr(args, "unknown_exporters", None):
        changes["unknown_exporters"] = args.unknown_exporters
    for kind in ("netflow", "sflow"):
        if getattr(args, f"{kind}_listen", None):
            changes[kind] = {**getattr(cfg, kind), "listen": list(args.__dict__[f"{kind}_listen"])}
            if kind not in changes.get("sources", cfg.sources):  # a listen address nothing would read
                raise UserError(f"--{kind}-listen: add --source {kind} (or `{kind}` to sources in the config)")
    if getattr(args, "interface", None):
        changes["capture"] = {**cfg.capture, "interfaces": list(args.interface)}
    if getattr(args, "no_host_addresses", None):
        changes["host_addresses"] = False
    if getattr(args, "no_attribution", None):
        changes["attribution"] = False
    if getattr(args, "rcvbuf", None) is not None:
        changes["source"] = {**changes.get("source", cfg.source), "rcvbuf": args.rcvbuf}
    if getattr(args, "rate_limit", None) is not None:
        changes["sampling"] = {**cfg.sampling, "per_destination_per_second": args.rate_limit}
    for flag, key in (("evidence_max_bytes", "max_bytes"), ("evidence_backups", "backups"),
                      ("evidence_fsync", "fsync")):
        if getattr(args, flag, None) is not None:
            changes["evidence"] = {**changes.get("evidence", cfg.evidence), key: getattr(args, flag)}
    if getattr(args, "sample", None):
        if args.sample < 1:
            raise UserError("--sample: N must be 1 or more")
        changes["sampling"] = {**changes.get("sampling", cfg.sampling), "one_in": args.sample}
    out = replace(cfg, **changes)
    host, _, port = out.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"listen: '{out.listen}' is not ADDRESS:PORT (e.g. 127.0.0.1:9807)")
    # Flags go through the same schema as the file, so a bad value is reported the same way.
    problems = [f"{yamlio.dotted(e.absolute_path)}: {e.message}" for e in schema_errors(SCHEMA, _as_dict(out))]
    problems += [p for _i, p in _exporter_problems(list(out.exporters))]
    problems += [p for _k, _i, p in _enforcement_problems(out.enforcement)]
    if problems:
        raise UserError("invalid settings", problems)
    return out
