"""Sinks: where verdicts go (audit report, Prometheus metrics, evidence log). A sink never alters a verdict."""
