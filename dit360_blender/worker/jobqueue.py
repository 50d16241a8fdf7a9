"""Jobs waiting and running in the worker: a thread-safe FIFO. Standard library only (no torch),
so the worker can start its socket before torch is imported."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class QueuedJob:
    """One queued job of `kind` (a `params.JOB_KINDS` name: its message type); `cancel` is the
    flag the pipeline's should_cancel reads."""

    job_id: str
    params: dict
    kind: str = "generate"
    submitted: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0  # sampling steps completed
    total: int | None = None  # sampling steps it runs (None: params' steps; an edit runs fewer)
    stage: str = "loading"  # the progress stage it is in (it starts by finding and loading models)
    cancel_step: int | None = None  # steps completed when the cancel arrived
    started: float = 0.0
    sampling_started: float = 0.0
    memory: dict = field(default_factory=dict)  # GPU memory peaks of its load, if it loaded (result event)

    def request_cancel(self) -> None:
        if not self.cancel.is_set():
            self.cancel_step = self.step
            self.cancel.set()


MAX_QUEUED_JOBS = 32  # a job's message is up to 1 MiB: the waiting ones stay a few tens of MiB at most


class JobQueue:
    """FIFO of jobs plus the one running; thread-safe. `take` blocks until a job or `stop`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[QueuedJob] = deque()
        self._running: QueuedJob | None = None
        self._stopped = False

    def put(self, job: QueuedJob, announce: Callable[[int], None]) -> bool:
        """Queue `job`; `announce(position)` is called under the lock so the `queued` reply is sent
        before the runner can start the job (position 0 = runs next). False, and nothing queued,
        when MAX_QUEUED_JOBS are already waiting."""
        with self._cond:
            if len(self._queue) >= MAX_QUEUED_JOBS:
                return False
            announce(len(self._queue) + (self._running is not None))
            self._queue.append(job)
            self._cond.notify_all()
            return True

    def take(self) -> QueuedJob | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            self._running = self._queue.popleft()
            return self._running

    def done(self, job: QueuedJob) -> None:
        with self._cond:
            if self._running is job:
                self._running = None

    def known(self, job_id: str) -> bool:
        with self._cond:
            return (self._running is not None and self._running.job_id == job_id) or any(
                j.job_id == job_id for j in self._queue
            )

    def cancel(self, job_id: str) -> tuple[str, QueuedJob] | None:
        """("running", job) after flagging it, ("queued", job) after removing it, or None."""
        with self._cond:
            if self._running is not None and self._running.job_id == job_id:
                self._running.request_cancel()
                return "running", self._running
            for job in self._queue:
                if job.job_id == job_id:
                    self._queue.remove(job)
                    return "queued", job
        return None

    def stop(self) -> list[QueuedJob]:
        """Cancel the running job, empty the queue (returning what was in it), wake `take`."""
        with self._cond:
            self._stopped = True
            if self._running is not None:
                self._running.request_cancel()
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return dropped

    def snapshot(self) -> tuple[str | None, list[str]]:
        with self._cond:
            return (self._running.job_id if self._running else None), [j.job_id for j in self._queue]
