"""Sources: each turns one kind of input into Flows. One package per input, each owning its reader,
its C accelerator (built optionally by setup.py) and nothing of another input's:

    capfile/     pcap and pcapng files (the audit): walk, vectorised decode, names and tunnel passes
    flowlog/     the product's JSON-lines flow format, which the evidence log also writes
    conntrack/   the kernel's connection-tracking table over netlink (live source and audit snapshot)
    capture/     live packets (AF_PACKET): names for conntrack's flows, or flows on their own
    live.py      the registry of live sources the daemon starts by name

`_addrtext.h` is the address formatter shared by the capture walk and the netlink reader. The
packet-header decoder and the netlink plumbing several of them use live in `agent.wire`.
A source may read files, sockets or kernel state; it never evaluates policy and never imports
another source's package, except that the capture source emits conntrack's event record
(`conntrack.table.CtEntry`) and reuses its rate limiter, so the daemon's worker sees one shape.
"""
