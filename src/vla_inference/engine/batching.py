"""How long a batch waits to fill: the fill window as a function of the fleet and the device time.

The model thread (model_thread.py) asks `Batching.plan` once per batch, when the first compatible
request is queued or the model comes free (whichever is later: the window *opens* then), and then
waits until `FillPlan.end` says go. What it weighs:

- the **fleet**: the most requests in flight at once over the last second or two
  (`RecentPeak`, kept by the engine at admission). A closed-loop fleet answered by one pass comes
  back; min(fleet, batch limit) is how many to expect (the *target*). When the target is queued
  and none is being preprocessed, nobody else is coming: the batch goes at once, without the
  configured window (a lone robot no longer pays VLA_BATCH_TIMEOUT_MS on every request).
- the **device time**: the forward passes' own times by batch size (`DeviceTimes`), fitted to
  t(b) = T1 + K x (b - 1). The pass's fixed part, T1 - K, is what running stragglers in a batch of
  their own costs again.
- the **arrival gap**: the median gap between requests reaching the queue (the server's own
  decode and preprocessing space a returning fleet out).

Waiting for the whole fleet beats letting it split into batches that alternate when the fleet
comes back within the pass's fixed part: fleet x gap < T1 - K (a fleet of N in one batch cycles
in t(N) + N x gap; two halves alternating, each returning while the other runs, in 2 t(N/2); the
first is shorter exactly when N x gap < T1 - K). Then (WAIT) the window *stretches* until the
target is queued, for at most T1 - K and at most STRETCH_GAPS x N x gap (a straggler costs the
others little), and ends early when requests stop arriving (none for IDLE_GAPS gaps, at least
the configured window, none being preprocessed): a robot left. Otherwise (GO), and until the
device time, the gaps and the fleet are known (MEASURING: the first second after start or after
a quiet spell), the window stretches as it always did: up to PREPROCESS_WAIT_FACTOR windows while
admitted requests are still being preprocessed. (Waiting only the configured window there was
tried: with the forward pass stubbed it formed smaller batches and cost more CPU per request,
and against the simulated device it gained nothing measurable; docs/benchmarks.md.)
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

PREPROCESS_WAIT_FACTOR = 5
IDLE_GAPS = 4  # a fleet whose requests stopped arriving for this many gaps has left
STRETCH_GAPS = 2  # a stretched window lasts at most this many times fleet x gap
GAPS_REMEMBERED = 32
FLEET_PERIOD_S = 1.0
EMA_WEIGHT = 0.2

MEASURING = "measuring"  # fleet, device time or gaps not known yet: the original stretch
WAIT = "wait"  # the fleet comes back within the pass's fixed part: wait for it
GO = "go"  # it does not: the original stretch


class RecentPeak:
    """The most requests in flight at once over the current and the previous period; None until
    requests have been in flight for a whole period (and again after a quiet period), when
    nothing is known of the fleet. `note` runs on the event loop; `read` (the model thread) only
    reads, so a racy read costs at most one stale answer."""

    def __init__(self, period_s: float = FLEET_PERIOD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period_s
        self._clock = clock
        self._bucket = -2
        self._current = 0
        self._previous = 0
        self._since = 0.0  # when the present spell of traffic began

    def note(self, in_flight: int) -> None:
        now = self._clock()
        bucket = int(now // self._period)
        if bucket != self._bucket:
            self._previous = self._current if bucket == self._bucket + 1 else 0
            self._current = 0
            self._bucket = bucket
            if self._previous == 0:
                self._since = now  # after a whole period without traffic, the fleet is unknown again
        if in_flight > self._current:
            self._current = in_flight

    def read(self) -> int | None:
        now = self._clock()
        bucket = int(now // self._period)
        if bucket == self._bucket:
            peak = max(self._previous, self._current)
        elif bucket == self._bucket + 1:
            peak = self._current
        else:
            return None
        if peak == 0 or now - self._since < self._period:
            return None
        return peak


class DeviceTimes:
    """Forward-pass times by batch size (moving averages) and the fixed part of a pass."""

    def __init__(self) -> None:
        self._mean: dict[int, float] = {}
        self._fixed: float | None = None

    def observe(self, batch: int, seconds: float) -> None:
        mean = self._mean.get(batch)
        self._mean[batch] = seconds if mean is None else mean + EMA_WEIGHT * (seconds - mean)
        self._fixed = None

    def mean(self, batch: int) -> float | None:
        return self._mean.get(batch)

    def fixed_cost(self) -> float | None:
        """T1 - K of the least-squares line t(b) = (T1 - K) + K b through the sizes seen, between 0
        and the fastest pass; one size seen: its time (K unknown); None before any pass."""
        if not self._mean:
            return None
        if self._fixed is None:
            sizes = list(self._mean)
            if len(sizes) == 1:
                self._fixed = self._mean[sizes[0]]
            else:
                mb = statistics.fmean(sizes)
                mt = statistics.fmean(self._mean.values())
                var = sum((b - mb) ** 2 for b in sizes)
                slope = sum((b - mb) * (t - mt) for b, t in self._mean.items()) / var
                self._fixed = min(max(0.0, mt - slope * mb), min(self._mean.values()))
        return self._fixed


@dataclass(frozen=True)
class FillPlan:
    """When one batch stops waiting for more requests (times in time.monotonic() seconds)."""

    mode: str  # MEASURING, WAIT or GO
    target: int  # requests expected: min(fleet, batch limit); the batch limit when the fleet is unknown
    opened: float
    window_end: float  # opened + VLA_BATCH_TIMEOUT_MS
    stretch_end: float  # how far the window may stretch for requests expected soon
    idle_s: float  # WAIT: requests stopped arriving for this long (none being preprocessed): go

    def end(self, queued: int, preparing: int, last_arrival: float) -> float | None:
        """When to stop waiting, given `queued` compatible requests, `preparing` admitted requests
        still being preprocessed and the last arrival at the queue; None: go now."""
        if queued >= self.target and preparing == 0:
            return None  # every request expected is here
        if self.mode == WAIT and queued < self.target:
            if preparing > 0:
                return self.stretch_end
            idle_end = max(self.window_end, max(last_arrival, self.opened) + self.idle_s)
            return min(self.stretch_end, idle_end)
        if self.mode != WAIT and preparing > 0:
            return self.stretch_end
        return self.window_end


class Batching:
    """The model thread's view of the fleet, the device and the arrivals (see the module docstring).
    Called with the model thread's queue lock held."""

    def __init__(self, max_batch: int, window_s: float, fleet: Callable[[], int | None]) -> None:
        self.max_batch = max_batch
        self.window_s = window_s
        self.device = DeviceTimes()
        self._fleet = fleet
        self._gaps: collections.deque[float] = collections.deque(maxlen=GAPS_REMEMBERED)
        self.last_arrival = 0.0

    def arrived(self, now: float) -> None:
        """A request reached the queue."""
        if self.last_arrival:
            self._gaps.append(now - self.last_arrival)
        self.last_arrival = now

    def gap(self) -> float | None:
        """The median gap between arrivals at the queue (None until a few were seen)."""
        return statistics.median(self._gaps) if len(self._gaps) >= 4 else None

    def plan(self, opened: float) -> FillPlan:
        window_end = opened + self.window_s
        fleet = self._fleet()
        target = self.max_batch if fleet is None else max(1, min(fleet, self.max_batch))
        fixed, gap = self.device.fixed_cost(), self.gap()
        if fleet is not None and fixed is not None and gap is not None and fleet * gap < fixed:
            stretch = opened + max(self.window_s, min(fixed, STRETCH_GAPS * fleet * gap))
            return FillPlan(WAIT, target, opened, window_end, stretch, max(self.window_s, IDLE_GAPS * gap))
        mode = MEASURING if fleet is None or fixed is None or gap is None else GO
        stretch = opened + self.window_s * PREPROCESS_WAIT_FACTOR
        return FillPlan(mode, target, opened, window_end, stretch, 0.0)
