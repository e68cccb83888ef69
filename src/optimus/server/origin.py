"""Host and Origin checks, and CORS for the origins that pass them.

Why: a web page can point a name it controls at 127.0.0.1 (DNS rebinding). The browser then
treats the local server as that page's own origin, so the page may call the API and read the
answers. The ``Host`` header still names the attacker's site, so a server bound to loopback
answers only to loopback names (and to those the operator lists). Separately, a request that
carries an ``Origin`` header was sent by a page; it is served only for allowed origins, and only
those origins get CORS headers, so no other site's page can read an answer.

Rules (``OriginPolicy``):

- Host check: on when bound to a loopback address, or when ``--allowed-hosts`` is given; off
  when bound elsewhere (``0.0.0.0``, a LAN address) without it, since then the names clients
  use are not known here; ``*`` in ``--allowed-hosts`` turns it off. When on, the Host's name
  (any port) must be ``localhost``, ``127.0.0.1``, ``[::1]``, the bound address, or a listed
  name (``.example.com`` also matches its subdomains); a missing or repeated Host is refused.
  Refusals are 400.
- Origin check, on every request that carries ``Origin``: allowed when ``--allowed-origins``
  lists it exactly (or holds ``*``), when its host is one the Host check accepts (any scheme
  and port), or when it is the request's own ``Host`` (same origin: a page this server served
  under a name it answers to). Refusals are 403, sent without CORS headers.
- CORS: answers to allowed origins carry ``Access-Control-Allow-Origin`` (that origin) and
  ``Vary: Origin``; preflights from them are answered here, before the API-key check (a
  browser sends no credentials on a preflight).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optimus.server.errors import APIError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"^[a-z0-9_.-]+$")  # a DNS name or an IPv4 literal (IPv6 comes bracketed)
_PREFLIGHT_METHODS = "GET, POST, OPTIONS"
_PREFLIGHT_MAX_AGE_S = "600"
_SHOWN = 100  # refusal messages quote at most this much of a header


# ---------------------------------------------------------------- names

def _bind_address(bind: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        return None


def is_loopback(bind: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    address = _bind_address(bind)
    return bind.lower() == "localhost" if address is None else address.is_loopback


def _bind_name(bind: str) -> str | None:
    """The bound address as a Host header names it; None for wildcards (no single name)."""
    address = _bind_address(bind)
    if address is None:
        return bind.lower().rstrip(".") or None
    if address.is_unspecified:
        return None
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6][:port]`` -> (lowercase name, port); None when malformed.
    IPv6 names are put in compressed form, so equal addresses compare equal."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        try:
            name = f"[{ipaddress.IPv6Address(value[1:end]).compressed}]" if end > 0 else ""
        except ValueError:
            return None
        rest = value[end + 1:]
    else:
        name, colon, port = value.partition(":")
        name, rest = name.rstrip("."), colon + port  # 'localhost.' is the same name
        if not _NAME.match(name):
            return None
    if not name:
        return None
    if not rest:
        return name, None
    port = rest[1:]
    if rest[0] != ":" or not port.isdigit() or int(port) > 65535:
        return None
    return name, int(port)


def split_origin(origin: str) -> tuple[str, str, int] | None:
    """``http(s)://host[:port]`` -> (scheme, name, port with the scheme's default filled in);
    None for anything else (``null``, other schemes, a path)."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS or "/" in rest or "@" in rest:
        return None
    parsed = split_host(rest)
    if parsed is None:
        return None
    name, port = parsed
    return scheme, name, _DEFAULT_PORTS[scheme] if port is None else port


def _normal_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


# ---------------------------------------------------------------- policy

@dataclass(frozen=True)
class OriginPolicy:
    check_host: bool
    hosts: frozenset[str]  # exact names (no port), lowercase
    domains: tuple[str, ...]  # '.example.com' entries: the domain and its subdomains
    origins: frozenset[str]  # exact origins, normalized
    any_origin: bool

    @classmethod
    def build(cls, bind: str, allowed_hosts: Iterable[str] = (),
              allowed_origins: Iterable[str] = ()) -> "OriginPolicy":
        """Raises ValueError naming the option on a malformed entry (at start-up, not per request)."""
        listed = [h.strip().lower() for h in allowed_hosts if h.strip()]
        names = [_host_entry(h) for h in listed if h != "*"]
        origins = [_origin_entry(o) for o in allowed_origins if o.strip()]
        bound = _bind_name(bind)
        return cls(check_host="*" not in listed and (is_loopback(bind) or bool(names)),
                   hosts=frozenset([*DEFAULT_HOSTS, *(n for n in names if not n.startswith(".")),
                                    *([bound] if bound else [])]),
                   domains=tuple(n for n in names if n.startswith(".")),
                   origins=frozenset(o for o in origins if o != "*"), any_origin="*" in origins)

    def host_listed(self, name: str) -> bool:
        return name in self.hosts or any(name == d[1:] or name.endswith(d) for d in self.domains)

    def host_refusal(self, values: list[str]) -> APIError | None:
        if not self.check_host:
            return None
        if not values:
            return _host_error("missing Host header: HTTP/1.1 requires one and this server checks it",
                               "missing_host")
        if len(values) > 1:
            return _host_error("more than one Host header", "host_not_allowed")
        parsed = split_host(values[0])
        if parsed is None or not self.host_listed(parsed[0]):
            return _host_error(f"Host {values[0][:_SHOWN]!r} is not allowed: this server answers to "
                               f"{', '.join(sorted(self.hosts))} (any port)", "host_not_allowed")
        return None

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        if self.any_origin or _normal_origin(origin) in self.origins:
            return True
        parsed = split_origin(origin)
        if parsed is None:
            return False
        scheme, name, port = parsed
        if self.host_listed(name):
            return True
        own = split_host(host) if host is not None else None  # same origin: the page came from here
        return own is not None and own[0] == name and (own[1] or _DEFAULT_PORTS[scheme]) == port

    def origin_refusal(self, values: list[str], host: str | None) -> APIError | None:
        if not values:
            return None
        if len(values) == 1 and self.origin_allowed(values[0], host):
            return None
        shown = values[0][:_SHOWN] if len(values) == 1 else "(several)"
        return APIError(403, f"Origin {shown!r} is not allowed to use this server; "
                             "allow it with --allowed-origins", code="origin_not_allowed")


def _host_entry(entry: str) -> str:
    """One ``--allowed-hosts`` entry, normalized: a name, or ``.domain`` for it and its subdomains."""
    dot = "." if entry.startswith(".") else ""
    parsed = split_host(entry[len(dot):])
    if parsed is None or parsed[1] is not None:
        raise ValueError(f"--allowed-hosts: {entry!r} is not a host name (give no scheme and no port)")
    return dot + parsed[0]


def _origin_entry(entry: str) -> str:
    """One ``--allowed-origins`` entry, normalized: ``*``, ``null`` or ``scheme://host[:port]``
    (other schemes, such as a browser extension's, are matched exactly)."""
    origin = _normal_origin(entry)
    scheme, sep, rest = origin.partition("://")
    if origin not in ("*", "null") and not (scheme and sep and rest and "/" not in rest):
        raise ValueError(f"--allowed-origins: {entry!r} is not an origin like https://app.example.com")
    return origin


def _host_error(reason: str, code: str) -> APIError:
    return APIError(400, f"{reason}; add names with --allowed-hosts ('*' turns the check off)", code=code)


# ---------------------------------------------------------------- middleware

def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


def _is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and any(k == b"access-control-request-method" for k, _ in scope["headers"])


class HostOriginGuard:
    """Pure ASGI (see middleware.py). Installed outermost, so every response, errors from the
    other middlewares included, passes its CORS step, and preflights never reach the key check."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts, origins = _header_values(scope, b"host"), _header_values(scope, b"origin")
        refusal = (self.policy.host_refusal(hosts)
                   or self.policy.origin_refusal(origins, hosts[0] if len(hosts) == 1 else None))
        if refusal is not None:
            await _refuse(refusal, scope, receive, send)
            return
        if not origins or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _is_preflight(scope):
            await _preflight(scope, origins[0], send)
            return
        await self.app(scope, receive, _with_cors(send, origins[0]))


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # policy violation
        return
    await error.response()(scope, receive, send)


def _cors_headers(headers: MutableHeaders, origin: str) -> None:
    headers["Access-Control-Allow-Origin"] = origin
    headers.add_vary_header("Origin")


def _with_cors(send: Send, origin: str) -> Send:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            _cors_headers(MutableHeaders(scope=message), origin)
        await send(message)

    return send_with_cors


async def _preflight(scope: Scope, origin: str, send: Send) -> None:
    """204 for an allowed origin: the methods the API uses and whatever headers it asked for
    (the official client adds its own ``x-stainless-*`` ones)."""
    headers = MutableHeaders()
    _cors_headers(headers, origin)
    headers["Access-Control-Allow-Methods"] = _PREFLIGHT_METHODS
    requested = _header_values(scope, b"access-control-request-headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = ", ".join(requested)
    headers["Access-Control-Max-Age"] = _PREFLIGHT_MAX_AGE_S
    await send({"type": "http.response.start", "status": 204, "headers": headers.raw})
    await send({"type": "http.response.body", "body": b""})
