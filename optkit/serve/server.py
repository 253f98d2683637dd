"""Running the app: in the foreground (``optkit serve``) or on a thread (notebooks, tests)."""

from __future__ import annotations

import threading
import time

import uvicorn


def run(app, host: str = "127.0.0.1", port: int = 10001, log_level: str = "info") -> None:
    """Serve until Ctrl-C; then stop accepting, give open streams 5 s, stop the engine."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """uvicorn on a daemon thread: ``with BackgroundServer(app) as s: httpx.get(s.url)``.

    ``port=0`` picks a free port; ``url`` is known once started.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread = threading.Thread(target=self.server.run, name="optkit-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout)
            self.thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
