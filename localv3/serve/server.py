"""Running the app under uvicorn: a socket bound before the model loads (requests meanwhile get
503), graceful shutdown on Ctrl-C or SIGTERM, and a BackgroundServer for in-process use.

uvicorn (on h11) because it speaks HTTP/1.1 keep-alive and server-sent events, reports a
client's disconnect to the application as soon as the socket closes, and drains open
responses on shutdown; its only dependencies are click and h11.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from localv3.errors import LocalV3Error
from localv3.serve.app import AppSettings, create_app
from localv3.serve.turns import Served
from localv3.serve.worker import GenerationWorker

DRAIN_TIMEOUT_S = 30  # how long shutdown waits for open responses before cancelling them


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    app: AppSettings = AppSettings(served_name="model")
    drain_timeout_s: int = DRAIN_TIMEOUT_S
    access_log: bool = False


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal only starts a graceful shutdown (a second one
    forces it): uvicorn would raise the signal again once stopped, and the CLI would report
    a drained, clean stop as an interrupted one."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        print("stopping: finishing the answers in progress (again to stop at once)", file=sys.stderr)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or one clear error (address in use, unknown host, no permission)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise LocalV3Error(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Service:
    """A bound socket, the worker that loads and runs the model, and the uvicorn server over both."""

    def __init__(self, settings: ServerSettings, load: Callable[[], Served]):
        self.socket = bind(settings.host, settings.port)
        self.worker = GenerationWorker(load, on_load_failure=self._stop)
        config = uvicorn.Config(
            create_app(self.worker, settings.app),
            log_level="info" if settings.access_log else "warning",
            access_log=settings.access_log,
            timeout_graceful_shutdown=settings.drain_timeout_s,
            lifespan="on",
        )
        self.server = _Server(config)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def run(self) -> None:
        """Serve until stopped (a signal, or a model that failed to load: then its error is raised)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()
            self.worker.stop(timeout=self.server.config.timeout_graceful_shutdown)
        if self.worker.load_error is not None:
            raise self.worker.load_error

    def _stop(self) -> None:
        self.server.should_exit = True


class BackgroundServer:
    """`with BackgroundServer(settings, load) as url:` serves from a thread of this process
    (tests, benchmarks) until the block ends; it waits for the model to be loaded unless told not to."""

    def __init__(
        self, settings: ServerSettings, load: Callable[[], Served], timeout_s: float = 120.0, wait_for_model: bool = True
    ):
        self.service = Service(settings, load)
        self.timeout_s = timeout_s
        self.wait_for_model = wait_for_model
        self.thread = threading.Thread(target=self._run, name="localv3-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # handed to the caller by __enter__ / __exit__
            self.error = exc

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not (self.service.server.started and (self.service.worker.ready or not self.wait_for_model)):
            if self.error is not None or not self.thread.is_alive():
                raise self.error or LocalV3Error("the server stopped while starting")
            if time.monotonic() > deadline:
                raise LocalV3Error(f"the server did not start within {self.timeout_s:g} s")
            time.sleep(0.01)
        return self.service.url

    def __exit__(self, *exc_info) -> None:
        self.service.server.should_exit = True
        self.thread.join()
