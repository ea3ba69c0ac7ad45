"""Only for the optional C accelerator; all metadata lives in pyproject.toml.

`optional=True`: where no compiler or Python headers exist the install still succeeds and the
capture reader uses its pure-Python walk (same results, slower on big captures).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("agent.sources._walk", ["agent/sources/_walk.c"], optional=True)])
