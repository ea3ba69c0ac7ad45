"""Loss accounting for a live source: every flow the kernel saw is judged, dropped for a named
reason, or shown as unaccounted.

Contract (per source, over any interval once the queue is drained):

    kernel flows = judged + dropped (by reason) + queued + unaccounted

`kernel` is the kernel's own count of new egress connections (`agent.sources.conntrack.kernel_count`),
relative to the value when the source started. `arrived` counts NEW events of egress flows the
source read; each arrival is routed to exactly one of judged / a drop reason / the queue, so the
source's side of the equation never depends on worker timing. `recovered` counts flows a
resynchronising dump found whose NEW event the kernel had dropped (they are judged too).

Overflow: when the kernel reports lost events (socket drops), the flows it counted but never
delivered, and that the resynchronising dump could not find (they ended meanwhile), are the gap.
Once the gap is stable for one interval (the storm is over and the dump has run) it is booked
as `overflow` drops, at most as many as the kernel said it lost. Anything else that goes missing
stays in `unaccounted`, which an alert watches: it means events vanished without the kernel
saying so (events disabled, a filter, a bug).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossAccount:
    kernel_base: int | None = None   # kernel counter when accounting (re)started
    kernel: int = 0                  # kernel flows since then
    arrived: int = 0                 # NEW events of egress flows read
    recovered: int = 0               # flows found by a resync dump after lost events
    overflow: int = 0                # flows booked as lost to overflow
    lost_events: int = 0             # events the kernel dropped (socket drops), all kinds
    _unbooked_events: int = 0        # lost events not yet matched by a booked gap
    _last_gap: int | None = None
    resync_pending: bool = False

    @property
    def gap(self) -> int:
        return self.kernel - self.arrived - self.recovered - self.overflow

    def kernel_reading(self, value: int | None) -> int:
        """Take a new counter reading; returns how much the kernel count grew (for the counter
        metric). A reading below the last (the table was reloaded) rebases without growth."""
        if value is None:
            return 0
        if self.kernel_base is None or value < self.kernel_base + self.kernel:
            # first reading, or the counter was reset: start over from here, keeping our totals
            self.kernel_base = value - self.kernel
            return 0
        grew = value - self.kernel_base - self.kernel
        self.kernel += grew
        return grew

    def events_lost(self, n: int):
        if n > 0:
            self.lost_events += n
            self._unbooked_events += n
            self.resync_pending = True

    def settle(self) -> int:
        """At the end of an accounting interval: book a stable gap to overflow when the kernel has
        reported lost events that are not booked yet. Returns the flows booked now."""
        gap = self.gap
        booked = 0
        if self.resync_pending:
            self._last_gap = None  # stability counts only from after the resynchronising dump
            return 0
        if self._unbooked_events and not self.resync_pending and gap > 0 and gap == self._last_gap:
            booked = min(gap, self._unbooked_events)
            self.overflow += booked
            self._unbooked_events = 0
            gap -= booked
        elif self._unbooked_events and not self.resync_pending and gap <= 0 and gap == self._last_gap:
            self._unbooked_events = 0  # everything lost was recovered by the dump
        self._last_gap = gap
        return booked

    @property
    def unaccounted(self) -> int:
        return self.gap
