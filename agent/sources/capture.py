"""The packet-capture source (scapy's socket layer): names for the flows conntrack reports.

    sources: [conntrack, capture]
    capture:
      interfaces: []        # default: every interface but loopback at start
      tls_ports: [443]      # TCP ports whose client bytes are read for a ClientHello
      name_wait: 0.5        # seconds a new flow waits for its hello before it is judged
      dns_grace: 30         # seconds a DNS answer still names flows after its TTL

One `conf.L2listen` packet socket per interface, each with a kernel BPF filter, so only what can
carry a name reaches Python: DNS responses, UDP datagrams large enough to be a client's QUIC
Initial, and TCP segments with payload to `tls_ports`. Packets are read raw (`recv_raw`, no
scapy dissection) and fed to `agent.names.extract.NameExtractor`, the same extractor `audit` runs
on captures. The kernel's drop count of each socket (PACKET_STATISTICS) is exported, so a name
lost to a full buffer is counted, not silent.

Contract: `CaptureNames(...).open()` raises UserError naming CAP_NET_RAW when packet sockets are
refused (the daemon exits 2 at start); `run(stop)` reads until `stop` is set and never raises.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time

from agent.errors import UserError
from agent.names.extract import NameExtractor
from agent.names.packet import transport
from agent.sources import decode as dec
from agent.sources.netlink import in_netns

log = logging.getLogger("egress-agent")
SOL_PACKET, PACKET_STATISTICS = 263, 6
SOURCE = "capture"


def bpf_filter(tls_ports) -> str:
    tls = " or ".join(f"tcp dst port {int(p)}" for p in tls_ports) or "tcp dst port 443"
    # frames above 90 octets: a TCP segment with payload (pure ACKs with options are 66-86)
    return f"udp src port 53 or udp src port 5353 or (udp and greater 1240) or (({tls}) and greater 90)"


class CaptureNames:
    def __init__(self, names: NameExtractor, interfaces=(), tls_ports=(443,), netns: str | None = None,
                 metrics=None):
        self.names, self.interfaces, self.tls_ports, self.netns = names, tuple(interfaces), tuple(tls_ports), netns
        self.metrics = metrics
        self.sockets: list = []
        self.packets = 0
        self.kernel_drops = 0
        self.unsupported = 0

    def open(self) -> CaptureNames:
        from scapy.all import conf

        with in_netns(self.netns):
            names = self.interfaces or tuple(n for _i, n in socket.if_nameindex() if n != "lo")
            for iface in names:
                try:
                    s = conf.L2listen(iface=iface, filter=bpf_filter(self.tls_ports))
                except PermissionError:
                    self.close()
                    raise UserError(f"capture source: opening a packet socket on {iface} needs CAP_NET_RAW "
                                    "(run as root, or add CAP_NET_RAW to the unit's AmbientCapabilities)") from None
                except OSError as e:
                    self.close()
                    raise UserError(f"capture source: interface {iface}: {e.strerror or e}") from None
                self.sockets.append((iface, s))
        if not self.sockets:
            raise UserError("capture source: no interface to listen on (capture.interfaces is empty and the "
                            "host has only loopback)")
        log.info("capture source: reading DNS answers, TLS and QUIC hellos on %s",
                 ", ".join(i for i, _ in self.sockets))
        return self

    def close(self):
        for _i, s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        self.sockets = []

    def _linktype(self, cls) -> int | None:
        name = getattr(cls, "__name__", "")
        if name in ("Ether", "CookedLinux"):
            return dec.ETHERNET if name == "Ether" else dec.SLL
        if name in ("IP", "IPv6", "Raw"):
            return dec.RAW
        return None

    def _drops(self) -> int:
        """Packets the kernel dropped since the last call (the counters reset when read)."""
        lost = 0
        for _i, s in self.sockets:
            try:
                _pk, drops = struct.unpack("II", s.ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            except OSError:
                continue
            lost += drops
        return lost

    def run(self, stop):
        m = self.metrics
        by_fd = {s.fileno(): s for _i, s in self.sockets}
        last_stats = time.monotonic()
        if m is not None:
            m.source_up.labels(SOURCE).set(1)
        while not stop.is_set():
            try:
                ready = select.select(list(by_fd), [], [], 0.25)[0]
                for fd in ready:
                    cls, data, ts = by_fd[fd].recv_raw(65535)
                    if data is None:
                        continue
                    self.packets += 1
                    lt = self._linktype(cls)
                    if lt is None:
                        self.unsupported += 1
                        continue
                    seg = transport(lt, data)
                    if seg is not None:
                        self.names.feed(seg, ts or time.time())
                if time.monotonic() - last_stats >= 1.0:
                    last_stats = time.monotonic()
                    self._export()
            except Exception as e:  # a bug or a vanished interface: say so, keep the other sockets
                log.exception("capture source: %s", e)
                if m is not None:
                    m.source_errors.labels(SOURCE, "io").inc()
                stop.wait(1)
        self._export()
        if m is not None:
            m.source_up.labels(SOURCE).set(0)
        self.close()

    def _export(self):
        lost = self._drops()
        self.kernel_drops += lost
        m = self.metrics
        if m is None:
            return
        m.capture_packets.inc(self.packets - m._capture_seen)
        m._capture_seen = self.packets
        if lost:
            m.events_lost.labels(SOURCE).inc(lost)
            log.warning("capture source: the kernel dropped %d packet(s) (socket buffer full); flows they "
                        "would have named are judged without a name", lost)
        counts = self.names.stats()
        for kind in ("dns", "tls", "quic"):
            n = counts.get(f"{kind}_malformed", 0)
            child = m.names_malformed.labels(kind)
            if n > child._value.get():
                child.inc(n - child._value.get())
