"""One factory for the Redis client a node uses.

``FLEET_REDIS_URL`` takes the URL forms redis-py knows (docs/redis.md has the details):

* ``redis://[[user]:password@]host[:port][/db]``: plain TCP; a password alone is
  ``redis://:password@host``, an ACL user ``redis://user:password@host``;
* ``rediss://…``: TLS, with the query options ``ssl_ca_certs``, ``ssl_ca_path``,
  ``ssl_certfile`` + ``ssl_keyfile`` (a client certificate, for mutual TLS),
  ``ssl_password``, ``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``),
  ``ssl_check_hostname`` and ``ssl_ciphers``;
* ``unix:///path/to/redis.sock[?db=N]``: a Unix socket (``unix://:password@/path…``);
* ``redis+sentinel://…`` and ``redis+cluster://…`` (``rediss+…`` with TLS): Sentinel and
  Cluster, handed to ``fleet.store.topology``.

These three forms also take ``db``, ``socket_timeout``, ``socket_connect_timeout``,
``socket_keepalive`` (TCP only), ``health_check_interval``, ``max_connections``,
``client_name`` and ``retry_on_timeout`` as query options. Anything else, a TLS option on
a non-TLS URL, a user without a password or a certificate file that cannot be read stops
the node at start-up with a ``ConfigError`` naming the option: a typo must not silently
weaken TLS.

The URL is a secret: nothing here logs it, or its user name or password. Log lines name
the target as ``host:port`` (or the socket path) only. Every failed connection attempt is
explained once in the log (authentication, TLS, refused, closed…), again at most once a
minute while it lasts, and its end is logged too.
"""

from __future__ import annotations

import inspect
import logging
import ssl
import time
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from fleet.errors import ConfigError
from fleet.settings import Settings
from fleet.store import command_retry
from fleet.store.topology import TLS_OPTIONS, connect_topology, is_topology_url

log = logging.getLogger("fleet.redis")

VARIABLE = "FLEET_REDIS_URL"
DEFAULT_MAX_CONNECTIONS = 256
SCHEMES = ("redis", "rediss", "unix")

#: Query options every URL form takes.
COMMON_OPTIONS = frozenset(
    {
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "health_check_interval",
        "max_connections",
        "client_name",
        "retry_on_timeout",
    }
)
#: Query options of TCP URLs (``redis://``, ``rediss://``).
TCP_OPTIONS = frozenset({"socket_keepalive"})
CERT_REQS = ("required", "optional", "none")
_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")

# No CLIENT SETINFO on connect: Redis < 7.2 does not know it, and a restrictive ACL would
# deny it (harmlessly, but into every ACL LOG). redis-py 8 turns it off with
# ``driver_info=None``; older versions with ``lib_name=None, lib_version=None``.
_NO_CLIENT_SETINFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)

#: Seconds between two log lines about the same connection problem.
REPEAT_SECONDS = 60.0


def connect(settings: Settings) -> Redis:
    """A client for ``FLEET_REDIS_URL``, or an embedded in-process Redis when it is unset.

    Raises ``ConfigError`` for a URL that cannot work (see the module docstring); the
    message never contains the URL."""
    if settings.redis_url is None:
        from fakeredis import FakeAsyncRedis, FakeServer

        log.warning(
            "FLEET_REDIS_URL is not set: using an embedded in-process Redis. Sessions live "
            "only in this process and are lost when it stops; run several nodes against a "
            "real Redis (FLEET_REDIS_URL=redis://host:6379/0)."
        )
        client: Redis = FakeAsyncRedis(server=FakeServer(), decode_responses=True)
        return client
    url = settings.redis_url.get_secret_value()
    if is_topology_url(url):
        log.info("Redis: %s", url.split("://", 1)[0].lower())  # the scheme, nothing more
        return connect_topology(url, _timeout(settings.node_ttl))
    options = connection_options(url, settings.node_ttl)
    target = describe(options)
    report = ConnectionReport(target)
    base: type[AbstractConnection] = options.pop("connection_class")
    reporting = cast(
        type[AbstractConnection],
        type(f"Reporting{base.__name__}", (_Reporting, _HiredisPacking, base), {"report": report}),
    )
    log.info("Redis: %s", target)
    # Bursts wait for a free connection (up to the socket timeout) rather than failing at
    # once as a plain pool does when it is full.
    options.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
    pool = BlockingConnectionPool(
        connection_class=reporting, timeout=options.get("socket_timeout") or 5.0, **options
    )
    return Redis.from_pool(pool)


def connection_options(url: str, node_ttl: float = 10.0) -> dict[str, Any]:
    """The connection pool's keyword arguments for ``url`` (``connection_class`` included),
    with fleet's timeouts as defaults that the URL's query may override. Raises
    ``ConfigError`` without quoting the URL."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        scheme = parts.scheme.lower()
    except ValueError:
        raise ConfigError(f"{VARIABLE}: not a valid URL") from None
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{VARIABLE}: the scheme must be redis://, rediss:// (TLS), unix://, "
            "redis+sentinel:// or redis+cluster:// (rediss+… with TLS)"
            + (f", not {scheme}://" if scheme.isalnum() else "")
        )
    allowed = COMMON_OPTIONS
    if scheme != "unix":
        allowed |= TCP_OPTIONS
    if scheme == "rediss":
        allowed |= TLS_OPTIONS
    for name in sorted(query):
        if name in TLS_OPTIONS and scheme != "rediss":
            raise ConfigError(f"{VARIABLE}: {name} is a TLS option: it needs a rediss:// URL")
        if name not in allowed:
            known = ", ".join(sorted(allowed - {"username", "password"}))
            raise ConfigError(f"{VARIABLE}: unknown option {name!r} (known: {known})")
    try:
        parsed: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:  # its messages name the option, never the value
        raise ConfigError(f"{VARIABLE}: {exc}") from None
    if parsed.get("username") and not parsed.get("password"):
        raise ConfigError(
            f"{VARIABLE}: a user name without a password; for a password alone write "
            "redis://:PASSWORD@host (note the colon)"
        )
    timeout = _timeout(node_ttl)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": max(1, int(node_ttl)),
        "retry": command_retry(),
        **parsed,
        "decode_responses": True,  # fleet reads strings everywhere
        **_NO_CLIENT_SETINFO,
    }
    options.setdefault("connection_class", _connection_class(scheme))
    if scheme == "rediss":
        _check_tls(options)
    return options


def _timeout(node_ttl: float) -> float:
    """A call that hangs longer than a third of the lease would let the lease lapse
    unnoticed: time out well before that."""
    return min(5.0, max(0.5, node_ttl / 3))


def _connection_class(scheme: str) -> type[AbstractConnection]:
    return {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(scheme, Connection)


def _check_tls(options: dict[str, Any]) -> None:
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs not in CERT_REQS:
        raise ConfigError(f"{VARIABLE}: ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    if options.get("ssl_keyfile") and not options.get("ssl_certfile"):
        raise ConfigError(f"{VARIABLE}: ssl_keyfile without ssl_certfile")
    for name in _FILE_OPTIONS:
        path = options.get(name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{VARIABLE}: {name}: no such file {path}")
    path = options.get("ssl_ca_path")
    if path is not None and not Path(path).is_dir():
        raise ConfigError(f"{VARIABLE}: ssl_ca_path: no such directory {path}")
    # Load the certificates now, as every new connection will: a bad file or a key that
    # does not match its certificate is a start-up error, not an endless reconnect loop.
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    try:
        SSLConnection(**tls).ssl_context.get()
    except (OSError, ValueError, RedisError) as exc:
        raise ConfigError(f"{VARIABLE}: cannot load the TLS files: {exc}") from None
    if reqs == "none":
        log.warning(
            "Redis TLS without certificate verification (ssl_cert_reqs=none): the link is "
            "encrypted, but anyone on the path can pretend to be Redis. Set ssl_ca_certs."
        )
    elif options.get("ssl_check_hostname") is False:
        log.warning(
            "Redis TLS without host name checking (ssl_check_hostname=false): any "
            "certificate the CA signed is accepted for this server."
        )


def describe(options: dict[str, Any]) -> str:
    """Where the client connects, for logs: no URL, no user name, no password."""
    cls = options.get("connection_class")
    if isinstance(cls, type) and issubclass(cls, UnixDomainSocketConnection):
        where = f"unix socket {options.get('path', '')}"
    else:
        where = f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    notes = [f"db {options.get('db', 0)}"]
    if isinstance(cls, type) and issubclass(cls, SSLConnection):
        reqs = options.get("ssl_cert_reqs", "required")
        notes.append("TLS" if reqs != "none" else "TLS without certificate verification")
        if options.get("ssl_certfile"):
            notes.append("client certificate")
    if options.get("username"):
        notes.append("ACL user")
    elif options.get("password"):
        notes.append("password")
    return f"{where} ({', '.join(notes)})"


class ConnectionReport:
    """Logs why connections to Redis fail: once per distinct problem, then at most once per
    ``REPEAT_SECONDS`` while it lasts, and once when a connection succeeds again."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.problem: str | None = None
        self.failures = 0
        self.connected_once = False
        self._logged: dict[str, float] = {}  # problem -> when it was last logged

    def failed(self, exc: BaseException, tls: bool) -> None:
        problem, lasting = explain(exc, tls)
        self.failures += 1
        self.problem = problem
        now = time.monotonic()
        # Problems may alternate (a TLS alert, then a reset, for one cause): each is
        # logged once per REPEAT_SECONDS, however they interleave.
        if now - self._logged.get(problem, -REPEAT_SECONDS) < REPEAT_SECONDS:
            return
        self._logged[problem] = now
        level = logging.ERROR if lasting else logging.WARNING
        log.log(level, "cannot connect to Redis at %s: %s", self.target, problem)

    def connected(self) -> None:
        if self.problem is not None:
            log.info(
                "connected to Redis at %s (after %d failed attempts)", self.target, self.failures
            )
        elif not self.connected_once:
            log.info("connected to Redis at %s", self.target)
        self.problem = None
        self.failures = 0
        self.connected_once = True
        self._logged.clear()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def explain(exc: BaseException, tls: bool) -> tuple[str, bool]:
    """A sentence for the log, and whether the problem lasts until someone acts (a wrong
    password, a bad certificate) rather than until the network or Redis is back. Redis and
    OpenSSL never put a password in their error messages; nor does this."""
    chain = _chain(exc)
    lasting = _explain_lasting(chain)
    if lasting is not None:
        return lasting, True
    return _explain_passing(chain, tls), False


def _explain_lasting(chain: list[BaseException]) -> str | None:
    """Problems that last until someone changes a setting or a certificate."""
    for err in chain:
        text = str(err).strip()
        if isinstance(err, AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH")):
            return (
                f"authentication failed ({text or type(err).__name__}): check the user name "
                f"and password in {VARIABLE}"
            )
        if isinstance(err, NoPermissionError):
            return (
                f"permission denied ({text}): the ACL user lacks a command fleet needs "
                "(docs/redis.md lists them)"
            )
        if isinstance(err, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed ({err.verify_message}): check "
                "ssl_ca_certs and that the server certificate names this host"
            )
        if isinstance(err, ssl.SSLError):
            return _explain_tls(err)
    if isinstance(chain[0], ResponseError):
        return f"Redis refused the connection set-up ({str(chain[0]).strip()})"
    return None


def _explain_passing(chain: list[BaseException], tls: bool) -> str:
    """Problems that may pass by themselves: the network, a restarting Redis."""
    if any(isinstance(err, ConnectionRefusedError) for err in chain):
        return "connection refused: is Redis running and listening there?"
    if any(isinstance(err, RedisTimeoutError | TimeoutError) for err in chain):
        if tls:
            return (
                "timed out (a TLS handshake with a port that does not speak TLS waits like "
                "this: is it the server's tls-port?)"
            )
        return "timed out"
    text = str(chain[0]).strip()
    dropped = any(isinstance(err, ConnectionResetError | BrokenPipeError) for err in chain)
    if dropped or "closed" in text.lower() or "reset" in text.lower():
        if tls:
            hint = "if it asks for client certificates, set ssl_certfile and ssl_keyfile"
        else:
            hint = "if it only accepts TLS, use a rediss:// URL"
        return f"the server dropped the connection during set-up ({text}); {hint}"
    return text or type(chain[0]).__name__


def _explain_tls(err: ssl.SSLError) -> str:
    reason = str(err.reason or err).upper()
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        hint = "the server asks for a client certificate: set ssl_certfile and ssl_keyfile"
    elif "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        hint = "the server does not accept the client certificate (ssl_certfile)"
    elif "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        hint = "the server does not speak TLS on this port: use redis://, or its tls-port"
    else:
        hint = f"check the TLS options in {VARIABLE}"
    return f"TLS failed ({err.reason or err}): {hint}"


class _Reporting(AbstractConnection):
    """Mixed into the pool's connection class: reports each connection set-up (socket, TLS
    handshake, AUTH, SELECT) to the client's ``ConnectionReport``."""

    report: ConnectionReport

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        try:
            await super().connect_check_health(check_health, retry_socket_connect)
        except (RedisError, OSError) as exc:
            self.report.failed(exc, tls=isinstance(self, SSLConnection))
            raise
        self.report.connected()


class _HiredisPacking(AbstractConnection):
    """Packs commands in C with hiredis, as redis-py's synchronous client does when hiredis
    is installed (its asyncio client packs in Python: about 7 % of a start's CPU). The
    bytes are the same; what hiredis does not take is left to redis-py's own packer."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # memoryviews, or a value Redis cannot take: redis-py decides
            return super().pack_command(*args)
