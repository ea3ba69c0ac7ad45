"""One verdict, three shapes: how a flow becomes verdicts, and the contract all three keep.

    pipeline.py   `Pipeline.judge(flow) -> Judged`: the reference, and the only place verdicts are
                  made (enrich -> evaluate each policy, through a verdict cache keyed on exactly
                  the facts the policies read). `policy test`, `audit --flows`, the daemon's full
                  path and the two shapes below all end here.
    bulk.py       `judge_table(pipe, table)`: the audit's columnar shape. Rows of a FlowTable
                  (`agent.flowtable`) are grouped by the verdict cache's key with numpy, and
                  `pipe.judge` runs once per group.
    fastlane.py   `FastLane.new(event, ...)`: the live worker's shape for NEW conntrack events
                  whose network and verdict-cache entry are already known; it writes the same
                  metrics and evidence bytes from cached parts, or declines and the full path runs.

The shared contract: for any flow, each shape gives the verdicts `Pipeline.judge` gives that flow,
and the same report rows, metrics and evidence bytes. It is held by tests, not by trust:
`tests/test_bulk.py` (whole audit reports, bulk against per flow), `tests/test_fastlane.py` (the
two live lanes, evidence byte for byte and metric for metric) and
`tests/policy/test_verdict_cache.py` (cached verdicts against direct `evaluate` calls).

Layering: `pipeline` and `bulk` sit above `enrich` and `policy` and below the sinks; `fastlane`
writes evidence and metrics itself, so it sits above the sinks, and only the daemon imports it.
"""
