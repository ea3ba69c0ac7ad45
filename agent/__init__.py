"""egress-agent: network-egress monitor that enforces data-residency policy."""

__version__ = "0.1.0"
