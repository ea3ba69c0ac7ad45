"""Live flow sources of the daemon: one module each, found by name, one small interface.

    sources: [conntrack, capture]     # config; or --source conntrack --source capture
    sources: [netflow, sflow]         # a collector of what routers export (agent/sources/netflow/source.py)

Interface (what `Daemon` relies on, nothing more):
- `Source(daemon)`: built with the daemon, whose `cfg`, `pipeline`, `metrics`, `stop` and
  `_enqueue(batch, drops)` it uses. `name` is its `source` metric label.
- `open()`: set-up that can fail for a reason the operator must fix (a missing capability, an
  unknown interface): raise UserError, and the daemon exits 2 at start. Returns the source.
- `run(stop)`: the source's thread. Reads until `stop` is set and never raises: faults are logged,
  counted in `egress_agent_source_errors_total{source,kind}` and retried. Flows go to the worker as
  batches of (kind, entry, counted): kind "new"/"dump"/"resync"/"destroy" for sources that see a
  flow end, "seen" for sources that only see it begin; `entry` a `conntrack.CtEntry` (or subclass).
Health metrics per source: `source_up`, `source_errors_total`, `source_drops_total{reason}`,
`source_events_lost_total`.

The flow collector (`netflow`, `sflow`) sends "flow" items: a connection a router exported, judged
once, then "destroy" when it goes quiet, with its final counters (`NetflowEntry`).
"""

from __future__ import annotations

from importlib import import_module

SOURCES = {"conntrack": "agent.sources.conntrack.source:ConntrackSource",
           "capture": "agent.sources.capture.source:CaptureSource",
           "netflow": "agent.sources.netflow.source:NetflowSource",
           "sflow": "agent.sources.netflow.source:SflowSource"}


def build(name: str, daemon):
    module, _, cls = SOURCES[name].partition(":")
    return getattr(import_module(module), cls)(daemon)
