"""egress-agent: network-egress monitor that enforces data-residency policy."""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per CPU at import, and they spin for a while: CPU stolen from
# the audit and the daemon, which never call BLAS, and tasks counted against the unit's TasksMax.
# An operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
