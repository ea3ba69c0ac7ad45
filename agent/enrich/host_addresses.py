"""The host's own addresses, from the kernel (pyroute2): flows from them are local, even when public.

A server with a public address sends from that address; without this, its outbound connections
would look like public-to-public traffic and never be judged. The daemon adds these addresses to
its local networks (as /32 and /128), so the scope table, the kernel event filter and the nft
egress counter all agree, and follows RTM_NEWADDR/RTM_DELADDR to keep them current.

Contract: `HostAddresses(netns).current()` -> sorted tuple of address texts (every family-4/6
address on every interface, loopback included; link-local too, which changes nothing since it is
never public). `watch(on_change, stop)` blocks, calling `on_change(addresses)` after each change,
until the `stop` event is set; netlink errors are retried, never raised.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import threading

from pyroute2 import IPRoute

log = logging.getLogger("egress-agent")
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100


def _text(msg) -> str | None:
    a = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    if not a:
        return None
    try:
        return str(ipaddress.ip_address(a.split("%")[0]))
    except ValueError:
        return None


class HostAddresses:
    def __init__(self, netns: str | None = None):
        self.netns = netns

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def current(self) -> tuple[str, ...]:
        with self._ipr() as ipr:
            return tuple(sorted({t for m in ipr.get_addr() if (t := _text(m))}))

    def watch(self, on_change, stop: threading.Event):
        last = None
        while not stop.is_set():
            try:
                with self._ipr() as ipr:
                    ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
                    # read after binding: a change between the two is in the new reading
                    now = self.current()
                    if now != last:
                        if last is not None:
                            on_change(now)
                        last = now
                    while not stop.is_set():
                        if not select.select([ipr.fileno()], [], [], 0.5)[0]:
                            continue  # wake up twice a second to notice `stop`
                        msgs = ipr.get()
                        if any(m.get("event") in ("RTM_NEWADDR", "RTM_DELADDR") for m in msgs):
                            now = self.current()
                            if now != last:
                                last = now
                                on_change(now)
            except Exception as e:  # netlink errors (pyroute2's are not all OSError): retry, never die
                log.warning("following the host's addresses failed (%s); retrying in 5 s", e)
                stop.wait(5)
