"""Checks every HTTP request passes before the app reads its body (pure ASGI middleware).

In order, each refusal a JSON error object ``{"error": {message, type, param, code}}``,
counted in ``optkit_requests_rejected_total{reason}``:

1. **Host** (400, ``host``): a request that arrives on a loopback address must name a
   loopback host (``localhost``, ``127.0.0.1``, ``[::1]``, any port) or one of
   ``allowed_hosts``, so a web page cannot reach a local server through DNS rebinding.
   When ``allowed_hosts`` is given, every request is checked; ``*`` turns the check off.
   400, as Starlette's ``TrustedHostMiddleware`` answers: the request names a host this
   server does not serve, which no credential changes (Jupyter answers 403).
2. **API key** (401, ``auth``): on the protected routes, ``Authorization: Bearer KEY`` must
   hold one of the keys (:class:`~optkit.serve.keys.KeyChecker`); the key is handed to the
   routes through :func:`accepted_key`.
3. **Body size** (413, ``too_large``): a ``Content-Length`` over ``max_body_bytes`` is
   refused before any of the body is read; a chunked body is read (to at most
   ``max_body_bytes`` plus one chunk) and refused as soon as it passes the limit.

A refusal of a request whose body was not read closes the connection, so the client stops
sending it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence

from fastapi import Request
from fastapi.routing import APIRoute

from optkit.serve.keys import KeyChecker
from optkit.serve.protocol import APIError, error_body

#: default request-body limit (bytes): a maximal token-id body parses in tens of ms
MAX_BODY_BYTES = 4 * 2**20
LOOPBACK_NAMES = ("localhost",)
UNAUTHORIZED = "invalid or missing API key (send 'Authorization: Bearer KEY')"


def accepted_key(request: Request) -> str | None:
    """FastAPI dependency: the API key the guard accepted (None when keys are off).
    Routes that depend on it are the protected ones (:func:`protected_paths`); one the
    guard let through unchecked while keys are on is refused here."""
    state = request.scope.get("state", {})
    if state.get("api_keys_on") and state.get("api_key") is None:
        raise APIError(401, UNAUTHORIZED, code="invalid_api_key")
    return state.get("api_key")


def protected_paths(routes: Iterable) -> list[re.Pattern]:
    """Path patterns of the routes that depend on :func:`accepted_key`."""
    return [r.path_regex for r in routes if isinstance(r, APIRoute)
            and any(d.call is accepted_key for d in r.dependant.dependencies)]


def host_name(host: str) -> str:
    """``Host`` header value -> the lower-case name without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    """A loopback host name or address (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if name in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


class Guard:
    """ASGI middleware: Host allow-list, API keys, body limit (see the module docstring).

    ``keys``: ``{key: weight}`` or None (no keys); ``protected``: path patterns that need a
    key; ``allowed_hosts``: Host names accepted besides the loopback ones (``*.example.com``
    also matches subdomains; ``*``: no check; None: only requests arriving on a loopback
    address are checked); ``metrics``: a :class:`~optkit.serve.metrics.Metrics` or None.
    """

    def __init__(self, app, *, keys=None, protected: Sequence[re.Pattern] = (),
                 max_body_bytes: int = MAX_BODY_BYTES,
                 allowed_hosts: Sequence[str] | None = None, metrics=None):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.keys = KeyChecker(keys) if keys else None
        self.protected = list(protected)
        self.max_body_bytes = max_body_bytes
        hosts = [host_name(h) for h in allowed_hosts or ()]
        for h in hosts:
            if not h or (h.startswith("*") and h != "*" and not h.startswith("*.")):
                raise ValueError(f"allowed_hosts: {h!r} is not a host name, '*.DOMAIN' or '*'")
        self.any_host = "*" in hosts
        self.check_all_hosts = allowed_hosts is not None
        self.hosts = {h for h in hosts if not h.startswith("*")}
        self.domains = tuple(h[1:] for h in hosts if h.startswith("*."))
        self.metrics = metrics

    def around(self, app) -> Guard:
        """This guard in front of ``app`` (for ``app.add_middleware(guard.around)``, which
        builds the middleware at the first request: options are checked here, earlier)."""
        self.app = app
        return self

    # -- checks -------------------------------------------------------------------------
    def host_allowed(self, scope) -> bool:
        if self.any_host:
            return True
        if not self.check_all_hosts:
            server = scope.get("server") or ("",)
            if not is_loopback(str(server[0])):
                return True
        host = _header(scope, b"host")
        if host is None:
            return False
        name = host_name(host.decode("latin-1"))
        return (is_loopback(name) or name in self.hosts
                or any(name.endswith(d) for d in self.domains))

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        has_body = (length not in (None, b"0")) or _header(scope, b"transfer-encoding") is not None
        if not self.host_allowed(scope):
            return await self.refuse(send, 400, "host", has_body, "invalid_host",
                                     "the Host header names a host this server does not "
                                     "serve (see optkit serve --allowed-hosts)")
        if self.keys is not None:
            scope.setdefault("state", {})["api_keys_on"] = True
            if any(p.match(_route_path(scope)) for p in self.protected):
                key = self.keys.check_header(_header(scope, b"authorization"))
                if key is None:
                    return await self.refuse(send, 401, "auth", has_body, "invalid_api_key",
                                             UNAUTHORIZED)
                scope["state"]["api_key"] = key
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await self.refuse(send, 400, "invalid", True, "invalid_content_length",
                                         "the Content-Length header is not a byte count")
            if n > self.max_body_bytes:
                return await self.too_large(send)
        elif has_body:  # chunked: read it here, counting, then hand it on whole
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    return await self.too_large(send)
                if not message.get("more_body", False):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    async def too_large(self, send):
        await self.refuse(send, 413, "too_large", True, "request_too_large",
                          f"the request body is larger than this server's limit of "
                          f"{self.max_body_bytes} bytes")

    async def refuse(self, send, status: int, reason: str, close: bool, code: str,
                     message: str, type: str = "invalid_request_error"):
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
        body = json.dumps(error_body(message, type, code=code)).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if close:  # the unread body would follow on this connection
            headers.append((b"connection", b"close"))
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def _route_path(scope) -> str:
    """The path the routes match: ``path`` less the ``root_path`` prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):] or "/"
    return path


def _replay(body: bytes, receive):
    """``receive`` that first gives ``body`` as one message, then defers to ``receive``."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
