"""The model thread: the queue of prepared samples, batch formation and the forward pass.

One thread owns the model. A preprocessing thread puts each prepared sample straight into this
queue (`put`, thread-safe), so a request crosses threads only three times: event loop ->
preprocessing pool -> model thread -> event loop (one callback per batch). The thread coalesces
compatible samples (equal batch_key) into batches of up to VLA_BATCH_SIZE, waiting at most
VLA_BATCH_TIMEOUT_MS; the fill window opens when the oldest sample was queued or when the model
came free, whichever is later, and stretches (up to PREPROCESS_WAIT_FACTOR windows) while
admitted requests are still being preprocessed, so that a closed-loop fleet answered by one pass
joins the next one instead of splitting into alternating half batches.

Expired and cancelled samples are dropped before they reach the model. A stream's samples are
queued as its StreamSession decides (engine/session.py: newest wins; the losers are answered
Skipped), and every sample that leaves the queue is reported to its session (`dequeued`). A failing
batch is retried so that only the failing samples fail: out of memory halves it, any other error
retries sample by sample. A model that knows which samples failed says so per sample instead
(`finish` raises NoValidAction): only those fail, and the batch is not run again. Futures belong
to the event loop: this thread only ever answers them through call_soon_threadsafe.

`step()` forms and runs one batch on the caller's thread from what is queued now, without the
batching window: tests drive an unstarted ModelThread by hand with it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from vla_inference.config import Settings
from vla_inference.engine.errors import (
    DeadlineExceeded,
    Draining,
    EngineError,
    ModelFailure,
    ResourceExhausted,
    Skipped,
)
from vla_inference.engine.session import StreamSession
from vla_inference.models.base import ActionPrediction, NoValidAction, PreparedSample, VLAModel
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
PREPROCESS_WAIT_FACTOR = 5


@dataclass(frozen=True)
class Completed:
    """A request's answer with where its time went (seconds)."""

    prediction: ActionPrediction
    queue_s: float
    model_s: float
    postprocess_s: float
    batch_size: int


@dataclass(eq=False)
class WorkItem:
    """One request between the loop and the model thread. The sample arrives from preprocessing."""

    future: asyncio.Future[Completed]
    loop: asyncio.AbstractEventLoop
    deadline: float
    request_id: str = ""
    session: StreamSession | None = None
    seq: int = 0  # order of arrival within its stream
    sample: PreparedSample | None = None
    queued_at: float = 0.0

    @property
    def live(self) -> bool:
        return not self.future.done()  # read from other threads too: answers are only set on the loop

    def fail(self, exc: BaseException) -> None:
        """Answer with an error from any thread."""
        self.loop.call_soon_threadsafe(_set_exception, self.future, exc)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _is_out_of_memory(exc: BaseException) -> bool:
    # Only look at torch when a model already imported it: importing it here, on the model thread
    # at the first failure, would stall the worker for seconds.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


def _release_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelThread:
    """The thread that owns the model (see the module docstring)."""

    def __init__(self, model: VLAModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._preparing = 0  # requests handed to preprocessing and not yet queued
        self._executing = 0
        self._stopped = False
        self._forward_started: float | None = None
        self._model_free_since = 0.0
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    # --- state (read from the loop; a racy read of a counter is fine for gauges and heuristics) ---
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def executing(self) -> int:
        return self._executing

    @property
    def forward_started(self) -> float | None:
        return self._forward_started

    # --- from other threads -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run fn(*args) on the model thread between batches (warm-up)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            self._calls.append((lambda: fn(*args), future))
            self._cond.notify()
        return future

    def preparing(self) -> None:
        """A request went to preprocessing: the fill window may wait for it."""
        with self._cond:
            self._preparing += 1

    def prepared(self, item: WorkItem | None) -> None:
        """Preprocessing ended: queue the item (None: it failed, nothing to queue)."""
        with self._cond:
            self._preparing -= 1
            if item is not None:
                self._put(item)
            self._cond.notify()

    def stop(self) -> None:
        """Stop after the batch in progress; queued requests are answered Draining."""
        with self._cond:
            self._stopped = True
            queued, self._queue = list(self._queue), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
            self._cond.notify()
        for item in queued:
            _dequeued(item)
            item.fail(Draining("server is shutting down"))
        for _, future in calls:
            future.cancel()

    # --- under the lock -----------------------------------------------------------------------------
    def _put(self, item: WorkItem) -> None:
        now = time.monotonic()
        if item.deadline <= now:
            item.fail(DeadlineExceeded("deadline passed before the request reached the model"))
            return
        if item.session is not None:
            queued, replaced = item.session.offer(item)
            if not queued:  # a newer observation of its stream got here first
                item.fail(Skipped("a newer observation of the stream was already queued"))
                return
            if replaced is not None:
                stale = cast(WorkItem, replaced)
                self._queue.remove(stale)  # pending items are queued: the session is told when one leaves
                stale.fail(Skipped("replaced by a newer observation"))
        item.queued_at = now
        self._queue.append(item)

    def _prune(self) -> None:
        """Drop answered, cancelled and expired items."""
        now = time.monotonic()
        kept: collections.deque[WorkItem] = collections.deque()
        for item in self._queue:
            if item.live and item.deadline > now:
                kept.append(item)
                continue
            _dequeued(item)
            if item.live:
                item.fail(DeadlineExceeded("deadline passed while queued; not run"))
        self._queue = kept

    def _next_batch(self) -> list[WorkItem] | None:
        """Wait for work and form one batch (None when stopped). Called with the lock held."""
        max_batch = self.settings.batch_size
        delay = self.settings.batch_timeout_ms / 1000
        while True:
            if self._stopped:
                return None
            if self._calls:
                return []
            self._prune()
            if not self._queue:
                self._cond.wait()
                continue
            first = self._queue[0]
            key = first.sample.batch_key if first.sample is not None else None
            opened = max(first.queued_at, self._model_free_since)
            window_end = opened + delay
            stretch_end = opened + delay * PREPROCESS_WAIT_FACTOR

            while max_batch > 1 and len(self._compatible(key)) < max_batch and not self._stopped:
                end = stretch_end if self._preparing > 0 else window_end
                remaining = end - time.monotonic()
                if remaining <= 0 or not first.live:
                    break
                self._cond.wait(remaining)
                self._prune()
            if self._stopped:
                return None
            if not first.live:
                continue
            return self._take(key, max_batch)

    def _take(self, key: Any, max_batch: int) -> list[WorkItem]:
        """Move up to max_batch compatible items from the queue into the batch being executed."""
        batch = self._compatible(key)[:max_batch]
        taken = set(map(id, batch))
        self._queue = collections.deque(i for i in self._queue if id(i) not in taken)
        for item in batch:
            _dequeued(item)
        self._executing = len(batch)
        return batch

    def _compatible(self, key: Any) -> list[WorkItem]:
        return [i for i in self._queue if i.sample is not None and i.sample.batch_key == key]

    # --- by hand (tests) ------------------------------------------------------------------------------
    def step(self) -> int:
        """Run what is due now on the caller's thread, without waiting: calls between batches, then
        one batch of what is queued (no batching window). The batch's size (0: nothing queued).
        Only for a ModelThread that was never started."""
        assert not self._thread.is_alive(), "step() drives an unstarted model thread"
        with self._cond:
            calls, self._calls = list(self._calls), collections.deque()
            self._prune()
            batch: list[WorkItem] = []
            if self._queue:
                first = self._queue[0]
                key = first.sample.batch_key if first.sample is not None else None
                batch = self._take(key, self.settings.batch_size)
        _run_calls(calls)
        if batch:
            self._execute(batch)
        return len(batch)

    # --- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                calls, self._calls = list(self._calls), collections.deque()
            if batch is None:
                return
            _run_calls(calls)
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        try:
            outcomes, model_s = self._run_batch([item.sample for item in batch if item.sample is not None])
        except Exception as exc:  # _run_batch catches model errors; this is a bug in it
            log.exception("model worker failed")
            outcomes, model_s = [(ModelFailure(f"model failed: {type(exc).__name__}"), 0.0)] * len(batch), 0.0
        with self._cond:
            self._executing = 0
            self._model_free_since = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.model_time.observe(model_s)
        answers: list[tuple[asyncio.Future[Completed], Completed | BaseException]] = []
        for item, (outcome, post_s) in zip(batch, outcomes, strict=True):
            self.metrics.queue_time.observe(started - item.queued_at)
            if isinstance(outcome, BaseException):
                answers.append((item.future, outcome))
            else:
                queue_s = started - item.queued_at
                answers.append((item.future, Completed(outcome, queue_s, model_s, post_s, len(batch))))
        batch[0].loop.call_soon_threadsafe(_deliver, answers)

    def _run_batch(
        self, samples: Sequence[PreparedSample]
    ) -> tuple[list[tuple[ActionPrediction | EngineError, float]], float]:
        """Forward + finish for one batch, isolating failures."""
        self._forward_started = time.monotonic()
        try:
            raws, ok = self._forward_isolating(list(samples))
        finally:
            model_s = time.monotonic() - self._forward_started
            self._forward_started = None
        outcomes: list[tuple[ActionPrediction | EngineError, float]] = []
        for raw, sample, good in zip(raws, samples, ok, strict=True):
            if not good:
                outcomes.append((raw, 0.0))
                continue
            t0 = time.monotonic()
            try:
                outcomes.append((self.model.finish(raw, sample), time.monotonic() - t0))
            except NoValidAction as exc:  # this sample's answer holds no action; the others stand
                log.warning("no valid action for a request: %s", exc)
                outcomes.append((ModelFailure(f"no valid action: {exc}"), 0.0))
            except Exception:
                log.exception("postprocessing failed")
                outcomes.append((ModelFailure("model postprocessing failed; see server log"), 0.0))
        return outcomes, model_s

    def _forward_isolating(self, samples: list[PreparedSample]) -> tuple[list[Any], list[bool]]:
        """Forward the batch; on failure split it so only the failing samples fail.

        Out of memory: halve the batch and retry (RESOURCE_EXHAUSTED only when one sample alone
        does not fit). Any other error: retry samples one by one (INTERNAL for the failing ones).
        """
        try:
            return list(self.model.forward(samples)), [True] * len(samples)
        except Exception as exc:
            oom = _is_out_of_memory(exc)
            if oom:
                _release_device_memory()
            if len(samples) == 1:
                if oom:
                    log.error("out of memory for a single sample: %s", exc)
                    return [ResourceExhausted("the model ran out of device memory for this request")], [False]
                log.exception("model forward failed")
                return [ModelFailure(f"model failed ({type(exc).__name__}); see server log")], [False]
            log.warning(
                "batch of %d failed (%s); retrying %s",
                len(samples),
                type(exc).__name__,
                "in halves" if oom else "one by one",
            )
            parts = (
                [samples[: len(samples) // 2], samples[len(samples) // 2 :]]
                if oom
                else [[s] for s in samples]
            )
            raws: list[Any] = []
            ok: list[bool] = []
            for part in parts:
                part_raws, part_ok = self._forward_isolating(part)
                raws += part_raws
                ok += part_ok
            return raws, ok


def _run_calls(calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]) -> None:
    for fn, future in calls:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


def _dequeued(item: WorkItem) -> None:
    if item.session is not None:
        item.session.dequeued(item)


def _deliver(answers: list[tuple[asyncio.Future[Completed], Completed | BaseException]]) -> None:
    """On the loop: answer every request of a batch (those still waiting)."""
    for future, answer in answers:
        if isinstance(answer, BaseException):
            _set_exception(future, answer)
        else:
            _set_result(future, answer)
