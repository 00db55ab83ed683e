"""One thread that runs jobs one at a time, in the order they were posted.

A stage's chunks must run in order, and torch already spreads one op over every core, so
a stage computes on one thread. It is fed straight from the event loop rather than through
`run_in_executor` from a worker task: that route woke the worker task, then the executor
thread, then the task again for every chunk (~0.4 ms per hop measured on 2 cores, an idle
process being slow to wake); here the chunk goes to a thread already waiting for it.
`idle()` tells the poster when nothing is queued or running, so that it may run a job
itself instead and skip even that hand-off (shard.node.stage_compute)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

_STOP = object()


class SerialThread:
    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue()
        self._unfinished = 0  # jobs posted and not yet through (run, taken, or skipped)
        self._counting = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def post(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue fn(*args); the future holds its result or exception."""
        future: Future = Future()
        self._count(1)
        self._jobs.put((future, fn, args))
        return future

    def idle(self) -> bool:
        """Whether every job posted is through: none queued, none running."""
        return self._unfinished == 0

    def _count(self, jobs: int) -> None:
        with self._counting:
            self._unfinished += jobs

    def queued(self) -> list[tuple[Callable[..., Any], tuple]]:
        """(fn, args) of the jobs not started yet, oldest first."""
        with self._jobs.mutex:
            return [(fn, args) for _, fn, args in self._jobs.queue if fn is not _STOP]

    def take(self, fn: Callable[..., Any], select: Callable[[tuple], bool | None], limit: int) -> list[tuple]:
        """Remove up to `limit` queued jobs of `fn`, oldest first, for the running job to
        run itself (a batch); their args are returned and their futures resolve to None, so
        only jobs whose results nobody awaits may be taken. `select(args)` says per job:
        True take it, False leave it queued, None stop looking (a job that must not be
        overtaken); the scan stops at the first job of another fn too."""
        taken, removed = [], 0
        with self._jobs.mutex:
            jobs = self._jobs.queue
            index = 0
            while index < len(jobs) and len(taken) < limit:
                future, job_fn, args = jobs[index]
                choice = select(args) if job_fn == fn else None
                if choice is None:
                    break
                if not choice:
                    index += 1
                    continue
                del jobs[index]
                removed += 1
                if future.set_running_or_notify_cancel():  # a cancelled job is dropped, as _serve would
                    future.set_result(None)
                    taken.append(args)
        self._count(-removed)
        return taken

    def close(self) -> None:
        """Stop after the running job; jobs still queued are cancelled."""
        with self._jobs.mutex:
            for future, _, _ in self._jobs.queue:
                future.cancel()
            self._jobs.queue.clear()
        self._jobs.put((Future(), _STOP, ()))

    def _serve(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if fn is _STOP:
                return
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(*args))
            except BaseException as error:  # handed to whoever awaits the job
                future.set_exception(error)
            finally:
                self._count(-1)
