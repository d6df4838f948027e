"""Who may talk to the server: origins, hosts and an optional bearer token.

A local model server is reachable by every web page the user opens (through the browser) and by DNS
rebinding, so the browser's own checks are put to work: a cross-origin grant (CORS) goes only to loopback
origins (the JS SDK's dev server on http://localhost:5173) and to origins named with `--allow-origin`; a
state-changing request from any other origin is refused. Bound to a loopback address, a request whose
`Host` is not a loopback name is refused: that is what a rebound DNS name looks like. A token, when set,
is required to start or stop a session; the session id that start_session returns (128 random bits) is
then the credential for that session's own routes.

The SDK's local mode sends no Authorization header on start_session, so the token can also ride in the
URL path: `apiUrl: "http://host:8080/auth/<token>"` (the SDK appends its routes to it), which is the
address the CLI prints.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TOKEN_ENV = "REACTOR_GRAPH_TOKEN"
AUTH_PREFIX = "/auth/{token}"

ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = ("Content-Type, Authorization, Reactor-API-Version, Reactor-API-Accept-Version, "
                 "Reactor-WebRTC-Version")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Refused(Exception):
    """A request this policy refuses; `status` is the HTTP status, the message says what would be right."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback_host(host: str) -> bool:
    """'localhost', '127.x.y.z', '::1' (bracketed or not), '*.localhost'; no port."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host_header(value: str) -> str:
    """'example.com:8080' -> 'example.com'; '[::1]:8080' -> '[::1]'."""
    value = value.strip()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def normalise_origin(origin: str) -> str | None:
    """'HTTP://LocalHost:5173/' -> 'http://localhost:5173'; None for what is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


@dataclass
class AccessPolicy:
    bind: str = "127.0.0.1"
    allow_origins: list[str] = field(default_factory=list)  # exact origins, beyond loopback ones
    token: str | None = None

    def __post_init__(self):
        bad = [o for o in self.allow_origins if normalise_origin(o) is None]
        if bad:
            raise ValueError(f"--allow-origin takes origins such as https://app.example.com, got {bad[0]!r}")
        self._allowed = {normalise_origin(o) for o in self.allow_origins}

    @property
    def loopback_only(self) -> bool:
        return is_loopback_host(self.bind)

    def origin_allowed(self, origin: str, host_header: str | None = None) -> bool:
        norm = normalise_origin(origin)
        if norm is None:
            return False
        if norm in self._allowed:
            return True
        if is_loopback_host(urlsplit(norm).hostname or ""):
            return True
        # same origin: our own page, served under the name the browser used for it
        return host_header is not None and urlsplit(norm).netloc == host_header.strip().lower()

    def cors_headers(self, origin: str | None, host_header: str | None, preflight: bool = False) -> dict[str, str]:
        """The grant for an allowed origin (nothing for others). Private Network Access is answered for
        allowed origins only, so a public page cannot reach this server through the browser."""
        if not origin or not self.origin_allowed(origin, host_header):
            return {}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers.update({"Access-Control-Allow-Methods": ALLOW_METHODS,
                            "Access-Control-Allow-Headers": ALLOW_HEADERS,
                            "Access-Control-Max-Age": "600",
                            "Access-Control-Allow-Private-Network": "true"})
        return headers

    def check(self, method: str, host_header: str | None, origin: str | None, needs_token: bool,
              authorization: str | None, path_token: str | None) -> None:
        """Raises Refused for a request this server must not serve."""
        if self.loopback_only:
            name = _split_host_header(host_header or "")
            if not is_loopback_host(name):
                raise Refused(403, f"this server is bound to {self.bind} and answers only loopback host names "
                                   f"(localhost, 127.0.0.1, [::1]), not {name[:80]!r}")
        if origin is not None and method not in SAFE_METHODS and not self.origin_allowed(origin, host_header):
            raise Refused(403, f"requests from the web origin {origin[:100]!r} are not allowed; start the server "
                               f"with --allow-origin {normalise_origin(origin) or 'ORIGIN'} to allow it")
        if needs_token and self.token is not None:
            given = path_token
            if given is None and authorization and authorization.lower().startswith("bearer "):
                given = authorization[7:].strip()
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise Refused(401, "this server needs its token: send 'Authorization: Bearer <token>', or use "
                                   "the address the server printed (…/auth/<token>) as the SDK's apiUrl")
