"""The preprocessing threads: one does the work, spares step in only behind a slow job.

Decoding and preprocessing are CPU work under one GIL. Several threads on a few cores mostly take
turns, and every extra runnable thread costs CPU in switches and cold caches (measured on 2 cores
with the forward pass stubbed: 2 threads working side by side cost 0.16 ms more CPU per request
than 1, for the same throughput; docs/benchmarks.md). So the *primary* thread takes every job,
in order; a *spare* takes the oldest waiting job only once it has waited SPARE_AFTER_S. One slow
decode (a huge PNG, a corrupt frame) thus holds the requests behind it up by at most that long,
not for its whole decode: no head-of-line blocking, and no second thread busy in the common case.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

SPARE_AFTER_S = 0.005


class PreprocessPool(concurrent.futures.Executor):
    """An Executor of `threads` threads (one primary, the rest spares; see the module docstring)."""

    def __init__(self, threads: int, name: str = "preprocess", spare_after_s: float = SPARE_AFTER_S) -> None:
        self._spare_after = spare_after_s
        self._lock = threading.Lock()
        self._primary_cond = threading.Condition(self._lock)
        self._spare_cond = threading.Condition(self._lock)
        self._jobs: collections.deque[tuple[float, concurrent.futures.Future[Any], Callable[[], Any]]] = (
            collections.deque()
        )
        self._primary_idle = False
        self._shutdown = False
        self._threads = [
            threading.Thread(target=self._work, args=(i == 0,), name=f"{name}_{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.append((time.monotonic(), future, lambda: fn(*args, **kwargs)))
            if self._primary_idle:
                self._primary_cond.notify()
            if len(self._jobs) > (1 if self._primary_idle else 0):
                self._spare_cond.notify()  # a spare times how long the primary leaves a job waiting
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending, self._jobs = list(self._jobs), collections.deque()
            self._primary_cond.notify_all()
            self._spare_cond.notify_all()
        if cancel_futures:
            for _, future, _ in pending:
                future.cancel()
        else:
            for _, future, job in pending:
                _run(future, job)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self, primary: bool) -> None:
        while True:
            with self._lock:
                job = self._next(primary)
            if job is None:
                return
            _run(*job)

    def _next(self, primary: bool) -> tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None:
        """The next job this thread may run (None: shut down). Called with the lock held."""
        while not self._shutdown:
            if primary:
                if self._jobs:
                    _, future, job = self._jobs.popleft()
                    return future, job
                self._primary_idle = True
                self._primary_cond.wait()
                self._primary_idle = False
                continue
            if not self._jobs:
                self._spare_cond.wait()
                continue
            waited = time.monotonic() - self._jobs[0][0]
            if waited >= self._spare_after:
                _, future, job = self._jobs.popleft()
                if self._jobs:
                    self._spare_cond.notify()  # the next spare times the next job
                return future, job
            self._spare_cond.wait(self._spare_after - waited)
        return None


def _run(future: concurrent.futures.Future[Any], job: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = job()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)
