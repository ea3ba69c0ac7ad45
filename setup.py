"""Only for the optional C accelerators; all metadata lives in pyproject.toml.

Each accelerator lives in the folder of the source it speeds up. `optional=True`: where no compiler
or Python headers exist the install still succeeds and the capture reader uses its pure-Python
walk, the conntrack source its Python decoder, the flow-log reader its Python columns, the
collector its Python data-set reader and connection table, and the evidence log its Python record
writer (same results, slower).
"""

from setuptools import Extension, setup

_H = ["agent/sources/_addrtext.h"]  # the address formatter both the capture walk and the netlink reader use
_ISO = ["agent/sinks/_isotime.h"]  # RFC 3339 times, shared by the evidence and report writers
_WALK_H = ["agent/sources/capfile/_packet.h", "agent/sources/capfile/_flowtable.h"]
setup(ext_modules=[Extension("agent.sources.capfile._walk", ["agent/sources/capfile/_walk.c"],
                             depends=[*_H, *_WALK_H], optional=True),
                   Extension("agent.sources.conntrack._ctnl", ["agent/sources/conntrack/_ctnl.c"], depends=_H,
                             optional=True),
                   Extension("agent.sources.netflow._nfdata", ["agent/sources/netflow/_nfdata.c"], depends=_H,
                             optional=True),
                   Extension("agent.sources.netflow._conntab", ["agent/sources/netflow/_conntab.c"],
                             depends=["agent/sources/netflow/_conntab_scope.h"], optional=True),
                   Extension("agent.sources.flowlog._flowlog", ["agent/sources/flowlog/_flowlog.c"], optional=True),
                   Extension("agent.sinks._evidence", ["agent/sinks/_evidence.c"], depends=_ISO, optional=True),
                   Extension("agent.sinks._records", ["agent/sinks/_records.c"], depends=_ISO, optional=True)])
