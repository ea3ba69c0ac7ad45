"""Bytes off the wire that more than one source or enricher decodes.

    decode.py    the scalar packet-header decoder (link layers, VLAN, IPv4/IPv6, ports, tunnels),
                 the reference the vectorised and C decoders are proven equal to (and scapy to it)
    netlink.py   plain netlink sockets: open, send, receive, namespaces (conntrack and sock_diag)

Depends on nothing of ours but `agent.errors`.
"""
