"""Running the app: in the foreground (``optkit serve``) or on a thread (notebooks, tests).

Shutdown (Ctrl-C, SIGTERM, :meth:`BackgroundServer.stop`) drains before uvicorn closes
anything: the scheduler of an app from :func:`~optkit.serve.app.create_app` is closed (new
requests get 503 with ``Retry-After``; sequences still waiting end at once), running
sequences get ``shutdown_timeout`` seconds to finish, then the scheduler stops: each stream
still open ends with an error event and ``data: [DONE]``, each non-streaming request with a
503.  Only then does uvicorn stop listening, wait up to :data:`FLUSH_TIMEOUT` s for the
responses to be sent, and run the app's shutdown.  A second Ctrl-C cuts the grace period
short.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)

#: Seconds running sequences get to finish on shutdown (``optkit serve --shutdown-timeout``).
SHUTDOWN_TIMEOUT = 30.0
#: Seconds uvicorn then waits for the ended responses to be sent before cancelling them.
FLUSH_TIMEOUT = 5
#: How often the drain checks for the end of the running sequences (seconds).
POLL = 0.05


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the app's scheduler (``app.state.scheduler``) before it
    shuts down (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float = SHUTDOWN_TIMEOUT):
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, not {shutdown_timeout}")
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        scheduler = getattr(getattr(self.config.app, "state", None), "scheduler", None)
        if scheduler is not None and not self.force_exit:
            await self.drain(scheduler)
        await super().shutdown(sockets)

    async def drain(self, scheduler) -> None:
        """Close ``scheduler``, give its running sequences the grace period, stop it."""
        scheduler.close(self.shutdown_timeout)
        running = scheduler.stats()["active"]
        if running:
            log.info("draining: %d sequence(s) in flight; running ones get up to %g s to "
                     "finish (Ctrl-C again to stop now)", running, self.shutdown_timeout)
        deadline = time.monotonic() + self.shutdown_timeout
        while not scheduler.idle and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        cut = scheduler.stats()["active"]
        if cut:
            log.warning("shutdown: ending %d unfinished sequence(s) with an error", cut)
        await asyncio.to_thread(scheduler.stop)


def make_server(app, host: str, port: int, log_level: str,
                shutdown_timeout: float) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=FLUSH_TIMEOUT)
    return DrainingServer(config, shutdown_timeout)


def run(app, host: str = "127.0.0.1", port: int = 10001, log_level: str = "info",
        shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Serve until Ctrl-C or SIGTERM; then drain (see the module docstring) and return."""
    server = make_server(app, host, port, log_level, shutdown_timeout)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it is done
        pass
    if not server.started:
        raise SystemExit(3)


class BackgroundServer:
    """uvicorn on a daemon thread: ``with BackgroundServer(app) as s: httpx.get(s.url)``.

    ``port=0`` picks a free port; ``url`` is known once started.  :meth:`stop` drains as
    Ctrl-C does (``shutdown_timeout`` seconds of grace).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", shutdown_timeout: float = SHUTDOWN_TIMEOUT):
        self.server = make_server(app, host, port, log_level, shutdown_timeout)
        self.config = self.server.config
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

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop; wait up to ``timeout`` s (default: the grace period + 60 s)."""
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(self.server.shutdown_timeout + 60 if timeout is None else timeout)
            self.thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
