"""Enforcement: refuse, in the kernel, the new connections a `refuse` policy forbids.

    compile.py   the engine's verdicts over the whole address space -> refuse intervals per policy
    cuts.py      where the location data can change (database networks, embedded registration runs)
    never.py     what is never refused: loopback, local_nets, management, resolvers, NTP, scrapers
    nft.py       the agent's nftables table: rendered text, applied in one transaction (libnftables)
    enforcer.py  the daemon's side: build, apply, rebuild on reload/database change, counters, evidence

Off unless asked twice: a policy says `enforce: refuse` and the host's switch (`enforce: refuse` in the
config or `--enforce refuse`) allows it. Fail-open by default: the table is owned by the agent's
netlink socket, so it disappears with the process.
"""
