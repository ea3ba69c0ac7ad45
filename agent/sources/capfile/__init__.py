"""Capture files (pcap, pcapng) -> flows, for `egress-agent audit`.

    reader.py    read_capture(path) -> Capture: the entry point; walks, decodes, aggregates
    stats.py     CaptureStats (what a person is told about the file) and format sniffing
    walk.py      record boundaries: a read()-based window, the pcap and pcapng walkers
    columns.py   the vectorised header decode of a chunk of records (numpy)
    flows.py     per-flow counters from decoded keys (FlowAccumulator)
    tunnels.py   the flows GRE and GTP-U packets carry
    names.py     the names pass: DNS answers, TLS and QUIC hellos -> host names on flows
    payload.py   the C walk's state across chunks, feeding the names and tunnel passes as it walks
    _walk.c      the optional C walk (record boundaries, decode and grouping), proven equal to Python

Import only points down: reader -> payload -> names / tunnels -> flows / columns / walk -> stats.
"""
