"""The model thread: the queue of prepared samples, batch formation and the forward pass.

One thread owns the model. A preprocessing thread puts each prepared sample straight into this
queue (`prepared`, thread-safe), so a request crosses threads only three times: event loop ->
preprocessing pool -> model thread -> event loop (the postprocessing thread's one callback per
batch; the hand-off between the two model-side threads is once per batch too). The thread coalesces
compatible samples (equal batch_key) into batches of up to VLA_BATCH_SIZE; how long a batch waits
to fill is batching.py's (the configured VLA_BATCH_TIMEOUT_MS window, opened when the oldest sample
was queued or when the model came free, whichever is later; skipped when every request expected
is queued; stretched for a closed-loop fleet that comes back within the forward pass's fixed part).
A producer wakes the thread only when that can end its wait (the queue reached the target, nothing
is left in preprocessing, or the thread was idle), not for every sample.

The forward pass is pipelined with its postprocessing: as soon as `forward` returns, the model
thread forms and starts the next batch, while the postprocessing thread runs `finish` for each
sample of the last one and hands the answers to the event loop (one callback per batch, batches in
order). On an accelerator the next batch's forward pass thus overlaps the CPU work of the last.

Expired and cancelled samples are dropped before they reach the model. A stream's samples are
queued as its StreamSession decides (engine/session.py: newest wins; the losers are answered
Skipped), and every sample that leaves the queue is reported to its session (`dequeued`). A failing
batch is retried so that only the failing samples fail: out of memory halves it, any other error
retries sample by sample. A model that knows which samples failed says so per sample instead
(`finish` raises NoValidAction): only those fail, and the batch is not run again. Futures belong
to the event loop: these threads only ever answer them through call_soon_threadsafe.

`step()` forms and runs one batch on the caller's thread from what is queued now, without the
batching window and with its postprocessing inline: tests drive an unstarted ModelThread by hand
with it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from vla_inference.config import Settings
from vla_inference.engine.batching import Batching
from vla_inference.engine.errors import (
    DeadlineExceeded,
    Draining,
    ModelFailure,
    ResourceExhausted,
    Skipped,
)
from vla_inference.engine.session import StreamSession
from vla_inference.models.base import ActionPrediction, NoValidAction, PreparedSample, VLAModel
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Ran:
    """A batch whose forward pass ended: what the postprocessing step needs."""

    batch: list[WorkItem]
    raws: list[Any]  # one per item: the raw output, or the EngineError it failed with
    ok: list[bool]
    model_s: float
    started: float


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

    def __init__(
        self,
        model: VLAModel,
        settings: Settings,
        metrics: Metrics,
        fleet: Callable[[], int | None] = lambda: None,
    ) -> None:
        """fleet: the most requests recently in flight at once (None: unknown), for batching.py."""
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self.batching = Batching(settings.batch_size, settings.batch_timeout_ms / 1000, fleet)
        self._preparing = 0  # requests handed to preprocessing and not yet queued
        self._executing = 0  # on the model, or being postprocessed
        self._wake_at: int | None = None  # producers notify once this many are queued (None: busy)
        self._stopped = False
        self._forward_started: float | None = None
        self._model_free_since = 0.0
        self._ran: queue.SimpleQueue[_Ran | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._post = threading.Thread(target=self._postprocess, name="postprocess", daemon=True)

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
        self._post.start()
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
        """Preprocessing ended: queue the item (None: it failed, nothing to queue). The model
        thread is woken only when this can end its wait."""
        with self._cond:
            self._preparing -= 1
            if item is not None:
                self._put(item)
            wake_at = self._wake_at
            if wake_at is not None and (len(self._queue) >= wake_at or self._preparing == 0):
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
        self.batching.arrived(now)

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
        while True:
            if self._stopped:
                return None
            if self._calls:
                return []
            self._prune()
            if not self._queue:
                self._wait(1, None)
                continue
            first = self._queue[0]
            key = first.sample.batch_key if first.sample is not None else None
            plan = self.batching.plan(max(first.queued_at, self._model_free_since))
            while max_batch > 1 and not self._stopped:
                queued = len(self._compatible(key))
                if queued >= max_batch or not first.live:
                    break
                end = plan.end(queued, self._preparing, self.batching.last_arrival)
                if end is None or end <= time.monotonic():
                    break
                self._wait(min(plan.target, max_batch), end - time.monotonic())
                self._prune()
            if self._stopped:
                return None
            if not first.live:
                continue
            self._wake_at = None
            return self._take(key, max_batch)

    def _wait(self, wake_at: int, timeout: float | None) -> None:
        """Sleep until a producer queues `wake_at` samples (or preprocessing empties), a call or a
        stop arrives, or `timeout` passes."""
        self._wake_at = wake_at
        self._cond.wait(timeout)
        self._wake_at = None

    def _take(self, key: Any, max_batch: int) -> list[WorkItem]:
        """Move up to max_batch compatible items from the queue into the batch being executed."""
        batch = self._compatible(key)[:max_batch]
        taken = set(map(id, batch))
        self._queue = collections.deque(i for i in self._queue if id(i) not in taken)
        for item in batch:
            _dequeued(item)
        self._executing += len(batch)
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
            self._finish(self._execute(batch))
        return len(batch)

    # --- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._next_batch()
                    calls, self._calls = list(self._calls), collections.deque()
                if batch is None:
                    return
                _run_calls(calls)
                if batch:
                    self._ran.put(self._execute(batch))
        finally:
            self._ran.put(None)  # the postprocessing thread ends after the batches before it

    def _postprocess(self) -> None:
        while (ran := self._ran.get()) is not None:
            self._finish(ran)

    def _execute(self, batch: list[WorkItem]) -> _Ran:
        """The batch's forward pass, isolating failures; the model is free when this returns."""
        started = time.monotonic()
        samples = [item.sample for item in batch if item.sample is not None]
        self._forward_started = started
        try:
            raws, ok = self._forward_isolating(samples)
        except Exception as exc:  # _forward_isolating catches model errors; this is a bug in it
            log.exception("model worker failed")
            raws, ok = (
                [ModelFailure(f"model failed: {type(exc).__name__}")] * len(batch),
                [False] * len(batch),
            )
        finally:
            model_s = time.monotonic() - started
            self._forward_started = None
        with self._cond:
            self._model_free_since = time.monotonic()
            if all(ok):
                self.batching.device.observe(len(batch), model_s)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.model_time.observe(model_s)
        return _Ran(batch, raws, ok, model_s, started)

    def _finish(self, ran: _Ran) -> None:
        """Postprocess each sample of a batch that ran and answer the batch (one loop callback)."""
        answers: list[tuple[asyncio.Future[Completed], Completed | BaseException]] = []
        size = len(ran.batch)
        for item, raw, good in zip(ran.batch, ran.raws, ran.ok, strict=True):
            queue_s = ran.started - item.queued_at
            self.metrics.queue_time.observe(queue_s)
            if not good:
                answers.append((item.future, raw))
                continue
            t0 = time.monotonic()
            try:
                prediction = self.model.finish(raw, cast(PreparedSample, item.sample))
            except NoValidAction as exc:  # this sample's answer holds no action; the others stand
                log.warning("no valid action for a request: %s", exc)
                answers.append((item.future, ModelFailure(f"no valid action: {exc}")))
                continue
            except Exception:
                log.exception("postprocessing failed")
                answers.append((item.future, ModelFailure("model postprocessing failed; see server log")))
                continue
            answers.append(
                (item.future, Completed(prediction, queue_s, ran.model_s, time.monotonic() - t0, size))
            )
        with self._cond:
            self._executing -= size
        try:
            ran.batch[0].loop.call_soon_threadsafe(_deliver, answers)
        except RuntimeError:  # the event loop closed (the server stopped): nobody is waiting
            log.debug("answers of a batch of %d dropped: the event loop is closed", size)

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
