"""Only for the optional C accelerator; all metadata lives in pyproject.toml.

`optional=True`: where no compiler or Python headers exist the install still succeeds and the
capture reader uses its pure-Python walk and the conntrack source its Python decoder (same results,
slower).
"""

from setuptools import Extension, setup

_H = ["agent/sources/_addrtext.h"]
setup(ext_modules=[Extension("agent.sources._walk", ["agent/sources/_walk.c"], depends=_H, optional=True),
                   Extension("agent.sources._ctnl", ["agent/sources/_ctnl.c"], depends=_H, optional=True),
                   Extension("agent.sources._flowlog", ["agent/sources/_flowlog.c"], optional=True),
                   Extension("agent.sinks._evidence", ["agent/sinks/_evidence.c"], optional=True)])
