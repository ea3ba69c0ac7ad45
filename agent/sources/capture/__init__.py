"""Live packets (AF_PACKET, a kernel BPF filter): names for conntrack's flows, or flows on their own.

    source.py   CaptureSource (the live plugin) and CaptureNames (DNS answers, TLS/QUIC hellos)
"""
