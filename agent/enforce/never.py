"""What enforcement never refuses, whatever a policy says: the networks that keep the host reachable.

`never_refuse(cfg, local_nets) -> list[Keep]`: loopback, `local_nets`, the configured management
networks, the resolvers in /etc/resolv.conf (and `capture.resolvers`), NTP servers (configured, and
the numeric servers of chrony, ntpd and systemd-timesyncd configuration) and the Prometheus
scrapers. Each entry says why it is there, so `policy check` can name what a policy would catch.
Host names in those files are left out (they would need DNS to mean anything); said in `skipped`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

LOOPBACK = ("127.0.0.0/8", "::1/128")
NTP_FILES = ("/etc/chrony/chrony.conf", "/etc/chrony.conf", "/etc/ntp.conf", "/etc/ntpsec/ntp.conf",
             "/etc/systemd/timesyncd.conf")
_NTP_LINE = re.compile(r"^\s*(?:server|pool|peer)\s+(\S+)", re.I)
_TIMESYNCD = re.compile(r"^\s*(?:NTP|FallbackNTP)\s*=\s*(.*)$")


@dataclass(frozen=True)
class Keep:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    why: str  # "resolver 192.0.2.53 (/etc/resolv.conf)"


def _net(text: str):
    try:
        return ipaddress.ip_network(text.strip().split("%")[0], strict=False)
    except ValueError:
        return None


def resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [p[1] for line in f if len(p := line.split()) >= 2 and p[0] == "nameserver"]
    except OSError:
        return []


def ntp_servers(paths=NTP_FILES) -> list[tuple[str, str]]:
    """(server, file) named in the NTP clients' configuration."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.split("#", 1)[0]
            if m := _NTP_LINE.match(line):
                out.append((m.group(1), path))
            elif path.endswith("timesyncd.conf") and (m := _TIMESYNCD.match(line)):
                out.extend((s, path) for s in m.group(1).split())
    return out


def never_refuse(cfg, local_nets=(), resolv_conf: str = "/etc/resolv.conf", ntp_files=NTP_FILES
                 ) -> tuple[list[Keep], list[str]]:
    """(entries, skipped): every network enforcement leaves alone, and the names it could not use."""
    opts = getattr(cfg, "enforcement", None) or {}
    keep: list[Keep] = [Keep(ipaddress.ip_network(n), "loopback") for n in LOOPBACK]
    skipped: list[str] = []

    def add(text: str, why: str):
        net = _net(text)
        if net is None:
            skipped.append(f"{why}: '{text}' is a name, not an address (not resolved: enforcement leaves it to DNS)")
        else:
            keep.append(Keep(net, why))

    for n in local_nets:
        add(str(n), f"local network {n} (local_nets)")
    for n in opts.get("management_nets") or ():
        add(n, f"management network {n} (enforcement.management_nets)")
    for r in resolvers(resolv_conf):
        add(r, f"resolver {r} ({resolv_conf})")
    for r in (getattr(cfg, "capture", None) or {}).get("resolvers") or ():
        add(r, f"resolver {r} (capture.resolvers)")
    for s in opts.get("ntp_servers") or ():
        add(s, f"NTP server {s} (enforcement.ntp_servers)")
    for s, path in ntp_servers(ntp_files):
        add(s, f"NTP server {s} ({path})")
    for s in opts.get("scrapers") or ():
        add(s, f"Prometheus scraper {s} (enforcement.scrapers)")
    return keep, skipped
