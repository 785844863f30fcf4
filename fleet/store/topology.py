"""Sentinel and Cluster forms of ``FLEET_REDIS_URL``.

* ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db]`` (and
  ``rediss+sentinel://`` for TLS to the master and the sentinels): the sentinels are asked
  for the current master of ``service_name``; after a failover the client follows the new
  master. ``?sentinel_password=…`` (and ``sentinel_username``) when the sentinels
  themselves require auth; the user and password in front are the master's.
* ``redis+cluster://[[user]:password@]host:port[,host:port…]`` (``rediss+cluster://``
  for TLS): any reachable nodes of a Redis Cluster; the client discovers the rest. Its
  pools wait for a free connection when full (``fleet.store.cluster_pool``).

Both take ``socket_timeout`` and ``socket_connect_timeout`` as query options, and the TLS
forms the same ``ssl_*`` options as ``rediss://`` (see docs/redis.md); Cluster also takes
``max_connections`` (per shard, 100 by default).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from fleet.errors import ConfigError
from fleet.store import command_retry
from fleet.store.cluster_pool import waiting_cluster

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
#: TLS query options, the same for every TLS form (``rediss://`` and the ones here).
TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ciphers",
    }
)
_SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username")
_CLUSTER_OPTIONS = ("max_connections",)


def is_topology_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES)


def _hosts(netloc: str, scheme: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"FLEET_REDIS_URL: {scheme}:// needs host:port[,host:port…]")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _options(url: str, timeout: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Connection options common to both forms, and the ones of one form only."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = (*_FLOAT_OPTIONS, *TLS_OPTIONS, *_SENTINEL_OPTIONS, *_CLUSTER_OPTIONS)
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise ConfigError(f"FLEET_REDIS_URL: unknown option(s) {', '.join(unknown)}")
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": command_retry(),
    }
    for name in _FLOAT_OPTIONS:
        if name in query:
            options[name] = float(query[name])
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    tls = scheme.startswith("rediss")
    for name in TLS_OPTIONS:
        if name in query:
            if not tls:
                raise ConfigError(f"FLEET_REDIS_URL: {name} needs a rediss+… URL")
            value: Any = query[name]
            if name == "ssl_check_hostname":
                value = value.lower() in ("1", "true", "yes")
            options[name] = value
    if tls:
        options["ssl"] = True
    own = {k: query[k] for k in (*_SENTINEL_OPTIONS, *_CLUSTER_OPTIONS) if k in query}
    return options, own


def connect_topology(url: str, timeout: float) -> Redis:
    """A client for a Sentinel- or Cluster-form URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options, own = _options(url, timeout)
    sentinel_options = {k: v for k, v in own.items() if k in _SENTINEL_OPTIONS}
    hosts = _hosts(parts.netloc, scheme)
    if scheme in CLUSTER_SCHEMES:
        if sentinel_options:
            raise ConfigError("FLEET_REDIS_URL: sentinel options on a cluster URL")
        if "max_connections" in own:
            if not own["max_connections"].isdigit() or int(own["max_connections"]) < 1:
                raise ConfigError("FLEET_REDIS_URL: max_connections must be a positive integer")
            options["max_connections"] = int(own["max_connections"])
        cluster: Redis = waiting_cluster(hosts, **options)  # type: ignore[assignment]
        return cluster
    if len(sentinel_options) != len(own):
        raise ConfigError("FLEET_REDIS_URL: max_connections is an option of cluster URLs")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError("FLEET_REDIS_URL: redis+sentinel:// needs /service_name")
    service = path[0]
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "decode_responses": True,
    }
    if "sentinel_password" in sentinel_options:
        sentinel_kwargs["password"] = sentinel_options["sentinel_password"]
    if "sentinel_username" in sentinel_options:
        sentinel_kwargs["username"] = sentinel_options["sentinel_username"]
    for name in (*TLS_OPTIONS, "ssl"):
        if name in options:
            sentinel_kwargs[name] = options[name]
    manager = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, db=db, **options)  # type: ignore[no-untyped-call]
    master: Redis = manager.master_for(service, redis_class=Redis)
    return master
