"""The one thread that owns the engine: it loads the model, then runs requests first in, first out.

torch sessions are not re-entrant, so nothing else touches the engine (or its tokenizer).
A request is a Job: work to run with the engine, and a queue of events back to the event
loop that serves its HTTP response. Setting `cancelled` (the client went away) drops a job
still waiting and stops a running one at its next token.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import TYPE_CHECKING

from localv3.errors import LocalV3Error
from localv3.serve.errors import ApiError, bad_request, server_error, unavailable

if TYPE_CHECKING:
    from localv3.generate import GenerationStats
    from localv3.serve.turns import Served


@dataclass(frozen=True)
class Failed:
    """The job ended with an error (the first event, or after some output)."""

    error: ApiError


@dataclass(frozen=True)
class Disconnected:
    """The client went away (queued by the response itself, never by the worker)."""


class Job:
    """One request's work and its event channel to the event loop."""

    def __init__(self, work: Callable[[Served, Job], GenerationStats | None], loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None

    def emit(self, event) -> None:
        """From the worker thread: hand an event to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def disconnect(self) -> None:
        """From the event loop: the client is gone; stop the work and wake the response."""
        self.cancelled.set()
        self.events.put_nowait(Disconnected())

    async def next_events(self) -> list:
        """The next event and any others already waiting (one network write for all of them)."""
        events = [await self.events.get()]
        while not self.events.empty():
            events.append(self.events.get_nowait())
        return events


@dataclass
class Counters:
    """What /metrics reports; written by the worker thread only."""

    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    last: dict = field(default_factory=dict)  # the last request's statistics

    def add(self, stats: GenerationStats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.completion_tokens += stats.completion_tokens
        self.last = stats.to_dict()


class GenerationWorker:
    def __init__(self, load: Callable[[], Served], on_load_failure: Callable[[], None] = lambda: None):
        self.load = load
        self.on_load_failure = on_load_failure
        self.queue: SimpleQueue = SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="localv3-generation", daemon=True)
        self.served: Served | None = None
        self.load_error: LocalV3Error | None = None
        self.counters = Counters()

    @property
    def ready(self) -> bool:
        return self.served is not None

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.served is None:
            raise unavailable("the model is still loading; retry shortly" if self.load_error is None else str(self.load_error))
        self.queue.put(job)

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        return self.queue.qsize()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job (or wait `timeout` s) after the ones queued before, then end the
        thread; a model still loading is not waited for (the thread is a daemon)."""
        if self.thread.is_alive() and self.served is not None:
            self.queue.put(None)
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            self.served = self.load()
        except Exception as exc:  # a LocalV3Error, or a model that cannot be built at all
            self.load_error = exc if isinstance(exc, LocalV3Error) else LocalV3Error(f"{type(exc).__name__}: {exc}")
            self.on_load_failure()
            return
        while (job := self.queue.get()) is not None:
            self._execute(job)

    def _execute(self, job: Job) -> None:
        counters = self.counters
        if job.cancelled.is_set():
            counters.cancelled += 1
            return
        job.started_at = time.perf_counter()
        counters.requests += 1
        try:
            stats = job.work(self.served, job)
        except ApiError as exc:
            counters.failed += 1
            job.emit(Failed(exc))
        except LocalV3Error as exc:  # what the engine refuses: a prompt it cannot take, a template error
            counters.failed += 1
            job.emit(Failed(bad_request(str(exc))))
        except Exception as exc:  # a bug: one line back to the client, the traceback here
            counters.failed += 1
            traceback.print_exc(file=sys.stderr)
            job.emit(Failed(server_error(f"{type(exc).__name__}: {exc}")))
        else:
            if stats is None:
                counters.cancelled += 1
            else:
                counters.add(stats)
        counters.busy_s += time.perf_counter() - job.started_at
