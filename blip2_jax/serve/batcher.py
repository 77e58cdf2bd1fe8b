"""Dynamic batching: a bounded queue of requests and one worker thread that runs them in batches.

The worker takes the oldest queued request and every other queued request with the same key (requests
with the same key can share one model call, e.g. the same decoding settings), up to `max_batch`; while
it has fewer, it waits for more until `max_wait_s` after the oldest one arrived. A request that finds
`queue_size` requests already queued is refused at once (`Busy`) instead of growing the queue.
The worker is the only thread that runs the model, so every model call is serialised. Under steady load a
request queued while a batch runs is usually past its wait when the batch ends and goes at once, so
clients can settle into groups that take turns (8 clients, batches of 4); a longer `max_wait_s` keeps
them together at the cost of latency for a lone request (README, "Serving").
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Hashable, Optional, Sequence

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: the caller should answer 503 and the client retry later."""


class Closed(Exception):
    """The batcher was closed (the server is shutting down)."""


@dataclasses.dataclass(eq=False)  # compared by identity (payloads hold arrays)
class _Pending:
    key: Hashable
    payload: Any
    future: concurrent.futures.Future
    arrived: float


class Batcher:
    """`submit(key, payload)` -> a future of `run_batch(key, payloads)[i]` for that payload.

    `run_batch(key, payloads)` returns one result per payload (or raises: every request of the batch
    then gets the exception). `before`, given to `start`, runs first on the worker thread (the warm-up);
    if it raises, `failure` holds the exception and queued requests fail with it.
    """

    def __init__(self, run_batch: Callable[[Hashable, Sequence[Any]], Sequence[Any]], *, max_batch: int,
                 max_wait_s: float, queue_size: int):
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None
        self.batches = 0   # model calls made for requests
        self.requests = 0  # requests those calls answered

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self, before: Optional[Callable[[], None]] = None) -> None:
        self._thread = threading.Thread(target=self._main, args=(before,), name="blip2_jax.serve.batcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, payload: Any) -> concurrent.futures.Future:
        """Queue one request; raises `Busy` when `queue_size` requests are already waiting."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise Busy(f"{len(self._queue)} requests are queued (the limit, --queue_size); retry later")
            self._queue.append(_Pending(key, payload, future, time.monotonic()))
            self._cond.notify()
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, fail the queued ones, and wait for the batch in progress."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_queued(Closed("the server is shutting down"))

    # -- the worker ----------------------------------------------------------------------------------
    def _main(self, before: Optional[Callable[[], None]]) -> None:
        if before is not None:
            try:
                before()
            except BaseException as e:  # noqa: BLE001 - reported by /health and the CLI, not lost in a thread
                log.exception("warm-up failed")
                self.failure = e
                with self._cond:
                    self._closed = True
                self._fail_queued(e)
                return
        while (batch := self._take()) is not None:
            self._run(batch)

    def _take(self) -> Optional[list[_Pending]]:
        """The next batch: the oldest request and its same-key followers (see the module docstring)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue[0]
            deadline = first.arrived + self.max_wait_s
            while True:
                same = [p for p in self._queue if p.key == first.key][:self.max_batch]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            for p in same:
                self._queue.remove(p)
            return same

    def _run(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.run_batch(live[0].key, [p.payload for p in live])
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error; the worker goes on
            log.exception("a batch of %d requests failed", len(live))
            for p in live:
                p.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(live)
        for p, r in zip(live, results):
            p.future.set_result(r)

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            pending, self._queue = list(self._queue), collections.deque()
        for p in pending:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(error)
