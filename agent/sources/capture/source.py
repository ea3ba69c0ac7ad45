"""The packet-capture source (scapy's socket layer): names on flows, and flows where conntrack is not.

    sources: [conntrack, capture]     # names for conntrack's flows (the default way to run it)
    sources: [capture]                # flows from capture too: hosts or containers without nf_conntrack
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

With conntrack on, capture only names flows. Alone, it is also the flow source: the first packet of
each connection becomes a flow (a TCP SYN without ACK; the first UDP datagram of a 5-tuple, kept in
a bounded table of recent 5-tuples, so a datagram after eviction counts again), judged once with
no end record (the capture sees no connection end). The sender of that SYN or datagram opened the
connection: a local host's connection to a public peer is egress; a public peer's to a local host is
inbound (judged while some policy asks for inbound connections); the first datagram back on a
5-tuple, or one from a service port to an ephemeral one, is an answer and no flow. Its losses:
kernel drops on the packet sockets (`source_events_lost_total{source="capture"}`), and `queue_full` drops; there is no
kernel flow counter to balance against, so `loss_accounting{source="capture"}` stays 0.

Contract: `CaptureSource(daemon).open()` (the live-source interface, `live.py`) raises UserError
naming CAP_NET_RAW when packet sockets are refused (the daemon exits 2 at start); `run(stop)`
reads until `stop` is set and never raises. `CaptureNames` is the reader itself (bench uses it).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections import OrderedDict

from agent.connections import SERVICE_PORTS
from agent.errors import UserError
from agent.flow import Flow
from agent.names.extract import MAX_TTL, NAME_EVENTS, NameExtractor
from agent.names.packet import transport
from agent.sources.conntrack.table import CtEntry
from agent.wire import decode as dec
from agent.wire.netlink import in_netns

log = logging.getLogger("egress-agent")
SOL_PACKET, PACKET_STATISTICS = 263, 6
SOURCE = "capture"
DRAIN = 512  # packets read from one socket per wake-up at most


def trusted_resolvers(configured, resolv_conf: str = "/etc/resolv.conf") -> set[bytes]:
    """Resolvers whose answers are believed without their query in sight (packed 16-byte
    addresses): `capture.resolvers` when set, else the nameservers of /etc/resolv.conf. A
    resolver on loopback is left out: the capture never sees loopback, and a query from the host
    to its upstream is matched anyway. An address that is not one raises UserError (exit 2)."""
    import ipaddress

    if configured is None:
        try:
            with open(resolv_conf, encoding="utf-8", errors="replace") as f:
                configured = [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
        except OSError:
            configured = []
        configured = [a.split("%")[0] for a in configured]
        strict = False
    else:
        strict = True
    out = set()
    for a in configured:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            if strict:
                raise UserError(f"capture.resolvers: '{a}' is not an IP address") from None
            continue
        if not ip.is_loopback:
            out.add(ip.packed if ip.version == 6 else bytes(12) + ip.packed)
    return out


def bpf_filter(tls_ports, flows: bool = False) -> str:
    tls = " or ".join(f"tcp dst port {int(p)}" for p in tls_ports) or "tcp dst port 443"
    # frames above 90 octets: a TCP segment with payload (pure ACKs with options are 66-86)
    names = f"udp port 53 or udp port 5353 or (udp and greater 1240) or (({tls}) and greater 90)"
    if not flows:
        return names
    # as the flow source: every TCP SYN without ACK (IPv6: flags byte at 40 + 13, no extension
    # headers), and UDP, whose first datagram per 5-tuple Python picks out
    syn = "(ip and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn) or (ip6 and ip6[6] == 6 and ip6[53] & 0x12 == 0x02)"
    return f"{names} or {syn} or udp"


class CaptureNames:
    def __init__(self, names: NameExtractor, interfaces=(), tls_ports=(443,), netns: str | None = None,
                 metrics=None, on_segment=None, on_round=None, rcvbuf: int = 8 << 20):
        self.names, self.interfaces, self.tls_ports, self.netns = names, tuple(interfaces), tuple(tls_ports), netns
        self.metrics = metrics
        self.rcvbuf = rcvbuf
        # flow-source mode: called with (segment, time) for every segment, and after each read round
        self.on_segment, self.on_round = on_segment, on_round
        self.sockets: list = []
        self.packets = 0
        self.kernel_drops = 0
        self.unsupported = 0
        self._exported = {"packets": 0, "dns": 0, "tls": 0, "quic": 0}  # what _export has counted so far

    def open(self) -> CaptureNames:
        from scapy.all import conf

        with in_netns(self.netns):
            names = self.interfaces or tuple(n for _i, n in socket.if_nameindex() if n != "lo")
            for iface in names:
                try:
                    s = conf.L2listen(iface=iface, filter=bpf_filter(self.tls_ports, self.on_segment is not None))
                except PermissionError:
                    self.close()
                    raise UserError(f"capture source: opening a packet socket on {iface} needs CAP_NET_RAW "
                                    "(run as root, or add CAP_NET_RAW to the unit's AmbientCapabilities)") from None
                except OSError as e:
                    self.close()
                    raise UserError(f"capture source: interface {iface}: {e.strerror or e}") from None
                except ImportError:  # scapy compiles the filter with libpcap through ctypes
                    self.close()
                    raise UserError("capture source: compiling the kernel packet filter needs libpcap, which is not "
                                    "installed (Debian: apt-get install libpcap0.8, or tcpdump, which brings it)") \
                        from None
                try:  # room for bursts; the kernel's drop counter says when it was not enough
                    s.ins.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE (root)
                except OSError:
                    s.ins.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                s.ins.setblocking(False)  # run() drains each socket until it would block
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
                    sock = by_fd[fd]
                    # drain what is queued (non-blocking), not one packet per select(): under load
                    # that halves the system calls per packet; bounded so no socket starves the others
                    for _ in range(DRAIN):
                        try:
                            cls, data, ts = sock.recv_raw(65535)
                        except (BlockingIOError, InterruptedError):
                            break
                        if data is None:
                            continue
                        self.packets += 1
                        lt = self._linktype(cls)
                        if lt is None:
                            self.unsupported += 1
                            continue
                        seg = transport(lt, data)
                        if seg is not None:
                            at = ts or time.time()
                            self.names.feed(seg, at)
                            if self.on_segment is not None:
                                self.on_segment(seg, at)
                if self.on_round is not None:
                    self.on_round()
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
        m.capture_packets.inc(self.packets - self._exported["packets"])
        self._exported["packets"] = self.packets
        if lost:
            m.events_lost.labels(SOURCE).inc(lost)
            m.source_errors.labels(SOURCE, "overflow").inc()
            log.warning("capture source: the kernel dropped %d packet(s) (socket buffer full); flows they "
                        "would have named are judged without a name", lost)
        counts = self.names.stats()
        for kind in ("dns", "tls", "quic"):
            n = counts.get(f"{kind}_malformed", 0)
            if n > self._exported[kind]:
                m.names_malformed.labels(kind).inc(n - self._exported[kind])
                self._exported[kind] = n
        for kind in NAME_EVENTS:  # what the name tables refused or dropped: bounded kinds
            n = counts.get(kind, 0)
            if n > self._exported.get(kind, 0):
                m.name_events.labels(kind).inc(n - self._exported.get(kind, 0))
                self._exported[kind] = n


class CaptureEntry(CtEntry):
    """A flow the capture source saw begin: a CtEntry (ct_id 0) whose flows say source "capture"."""

    __slots__ = ()

    def flow(self, now: float, last: float | None = None) -> Flow:
        return Flow(proto=self.proto, src=self.src, sport=self.sport, dst=self.dst, dport=self.dport,
                    packets=1, bytes=self.bytes, first_seen=self.start_ns / 1e9 if self.start_ns else now,
                    last_seen=last or now, source=SOURCE)


class CaptureSource:
    """The live-source interface (`live.py`) around `CaptureNames`."""

    name = SOURCE
    MAX_SEEN = 65536  # recent UDP 5-tuples, so only a flow's first datagram becomes a flow

    def __init__(self, daemon):
        self.d = daemon
        self.flows = "conntrack" not in daemon.cfg.sources
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._batch: list = []
        self.reader: CaptureNames | None = None
        from agent.sources.conntrack.source import RateLimit

        self.one_in = max(1, int(daemon.cfg.sampling.get("one_in", 1)))
        self.limiter = RateLimit(float(daemon.cfg.sampling.get("per_destination_per_second", 0)))

    def open(self):
        from agent.names.extract import packed

        d, cap = self.d, self.d.cfg.capture
        d.name_wait = float(cap.get("name_wait", 0.5))
        d._host_packed = frozenset(packed(a) for a in d.host_addrs)
        # every address of this host is one DNS client: a stub resolver on loopback answers for all
        host_id, loop4, loop6 = b"host", packed("127.0.0.1")[:13], packed("::1")
        client_of = lambda a: host_id if a in d._host_packed or a[:13] == loop4 or a == loop6 else a  # noqa: E731
        names = NameExtractor(grace=float(cap.get("dns_grace", 30)), client_of=client_of,
                              resolvers=trusted_resolvers(cap.get("resolvers")),
                              max_ttl=int(cap.get("dns_max_ttl", MAX_TTL)))
        d.metrics.source(SOURCE)
        self.reader = CaptureNames(names, cap.get("interfaces") or (), cap.get("tls_ports") or (443,),
                                   d.cfg.source.get("netns"), d.metrics,
                                   on_segment=self._segment if self.flows else None,
                                   on_round=self._flush if self.flows else None).open()
        d.names = names
        if self.flows:
            d.metrics.loss_accounting.labels(SOURCE).set(0)
            log.info("capture source: flows come from capture (no conntrack): first packets of connections")
        return self

    def run(self, stop):
        self.reader.run(stop)

    def _segment(self, seg, at: float):
        key = (seg.proto, seg.src, seg.sport, seg.dst, seg.dport)
        if seg.proto == 6:
            if seg.flags & 0x12 != 0x02:
                return  # not an opening SYN
        elif key in self._seen:
            self._seen.move_to_end(key)
            return
        else:
            self._seen[key] = None
            if len(self._seen) > self.MAX_SEEN:
                self._seen.popitem(last=False)
            if (seg.proto, seg.dst, seg.dport, seg.src, seg.sport) in self._seen:
                return  # the first datagram back: an answer, not a flow of its own
        src, dst = _text(seg.src), _text(seg.dst)
        d = self.d
        pipe = d.pipeline
        if not pipe.scoper.is_egress(src, dst):
            # who opened it is the SYN's or the first datagram's sender; a datagram from a service
            # port to an ephemeral one answers a request the capture missed (the port rule)
            if not (pipe.inbound and pipe.scoper.is_egress(dst, src)):
                return
            if seg.proto == 17 and _service(seg.sport) and not _service(seg.dport):
                return
        m = d.metrics
        m.source_events.labels(SOURCE, "new").inc()
        d.seen_new += 1
        # sampling as for conntrack: 1 in N by a hash of the tuple, then a per-destination rate limit
        if self.one_in > 1 and hash(key) % self.one_in:
            m.drops.labels(SOURCE, "sampled").inc()
            return
        if not self.limiter.allow(dst, time.monotonic()):
            m.drops.labels(SOURCE, "rate_limited").inc()
            return
        d.kept_new += 1
        iplen = len(seg.payload) + (20 if seg.src[:12] == bytes(12) else 40) + (8 if seg.proto == 17 else 20)
        self._batch.append(("seen", CaptureEntry(0, seg.proto, src, seg.sport, dst, seg.dport, 1, iplen,
                                                 int(at * 1e9), None, None), True))
        if len(self._batch) >= 4096:
            self._flush()

    def _flush(self):
        if self._batch:
            batch, self._batch = self._batch, []
            self.d._enqueue(batch, {"queue_full": self.d.metrics.drops.labels(SOURCE, "queue_full")})


_SERVICE = frozenset(int(p) for p in SERVICE_PORTS)


def _service(port: int) -> bool:
    """`agent.connections.service_port` for one port."""
    return port < 1024 or port in _SERVICE


def _text(a: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, a[12:]) if a[:12] == bytes(12) else socket.inet_ntop(socket.AF_INET6, a)
