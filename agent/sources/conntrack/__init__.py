"""The kernel's connection-tracking table, over netlink.

    table.py         CtEntry, the ctnetlink decoder (generic walk + learned layouts), dumps, events
    source.py        the live source: follows NEW/DESTROY, resynchronises, counts every loss
    filter.py        the classic BPF filter on the event socket (the scope table, compiled)
    kernel_count.py  the nftables counter of new local -> public connections (the loss reference)
    _ctnl.c          the optional C event reader (recvmmsg + decode) and batched sock_diag lookups
"""
