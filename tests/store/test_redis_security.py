"""Secured Redis, for real: ``redis-server`` processes with a password, an ACL user, TLS,
mutual TLS, a Unix socket and the minimal ACL of docs/redis.md, each used by a node in
this process and by a real ``python -m fleet serve``. Certificates (a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate) are made with ``openssl``
at test time.

What must hold: every form works through a session's start and close; a wrong password
or a wrong TLS set-up gives a node that stays up and not ready, says why in one clear log
line, and never shows the password (in its log, ``/ready`` or ``/metrics``); a URL that
cannot work stops ``fleet serve`` at once with a message naming the option.

Nothing here is skipped: without ``redis-server`` or ``openssl`` the tests fail with the
command that installs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.asyncio import Redis as AsyncRedis

from fleet.api import create_app
from fleet.errors import ConfigError
from fleet.runtime.node import Node
from fleet.settings import Settings
from fleet.store.connect import connect, connection_options, describe
from tests.conftest import wait_ready
from tests.multinode.harness import LocalFleet, NodeProcess
from tests.redis_server import INSTALL_HINT, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
OPENSSL_HINT = "apt-get install -y openssl"

# Characters that must be percent-encoded in a URL, so that the encoding is tested too.
PASSWORD = f"pw:@/#%{secrets.token_hex(8)}"
APP_USER = "fleet-app"
APP_PASSWORD = f"app:@/{secrets.token_hex(8)}"
WRONG_PASSWORD = f"wrong-{secrets.token_hex(8)}"


def enc(secret: str) -> str:
    return quote(secret, safe="")


def assert_no_secret(text: str, *secrets_: str) -> None:
    for secret in secrets_ or (PASSWORD, APP_PASSWORD, WRONG_PASSWORD):
        assert secret not in text and enc(secret) not in text, "a password leaked"


# -- certificates --------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr}")


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for localhost and 127.0.0.1 and a client certificate,
    all P-256 (fast to make)."""
    if shutil.which("openssl") is None:
        pytest.fail(f"openssl is not installed; install it with: {OPENSSL_HINT}", pytrace=False)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=fleet test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    extensions = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
        "client": "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    }
    for who, ext in extensions.items():
        (directory / f"{who}.ext").write_text(ext)
        _openssl(
            "req", "-new", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN=fleet-{who}", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext",
            cwd=directory,
        )  # fmt: skip
    return Certs(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


# -- servers -------------------------------------------------------------------------------
class SecureRedis(RedisServer):
    """A ``redis-server`` with a password, ACL users, TLS (``--port 0``: TLS only) or a Unix
    socket. Its readiness probe speaks TLS and authenticates as ``admin_password``."""

    def __init__(
        self,
        *extra: str,
        admin_password: str | None = None,
        certs: Certs | None = None,
        client_certs: bool = False,
        unixsocket: bool = False,
    ) -> None:
        super().__init__(None, *extra)
        self.admin_password = admin_password
        self.certs = certs
        self.client_certs = client_certs
        self.socket = self.dir / "redis.sock" if unixsocket else None
        self.log_path = self.dir / "redis.log"
        self.fleet_url: str | None = None  # what LocalFleet's nodes get as FLEET_REDIS_URL

    @property
    def url(self) -> str:
        return self.fleet_url or super().url

    def args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.certs is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.certs.server_cert),
                "--tls-key-file", str(self.certs.server_key),
                "--tls-ca-cert-file", str(self.certs.ca),
                "--tls-auth-clients", "yes" if self.client_certs else "no",
            ]  # fmt: skip
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        return [*args, *self.extra]

    def admin(self) -> redis.Redis:
        kwargs: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "password": self.admin_password,
            "decode_responses": True,
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
        }
        if self.certs is not None:
            kwargs |= {
                "ssl": True,
                "ssl_ca_certs": str(self.certs.ca),
                "ssl_certfile": str(self.certs.client_cert),
                "ssl_keyfile": str(self.certs.client_key),
            }
        return redis.Redis(**kwargs)

    def start(self) -> SecureRedis:
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with self.admin() as client:
                    if client.ping():
                        return self
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")


def set_requirepass(server: SecureRedis, old: str, new: str) -> None:
    """Change the default user's password, through a connection that logs in with ``old``."""
    server.admin_password = old
    with server.admin() as admin:
        admin.config_set("requirepass", new)
    server.admin_password = new


@contextmanager
def running(server: SecureRedis) -> Iterator[SecureRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail(f"redis-server is not installed; install it with: {INSTALL_HINT}")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def auth_server() -> Iterator[SecureRedis]:
    """``requirepass`` for the default user, an ACL user, and a Unix socket."""
    user = ["--user", APP_USER, "on", f">{APP_PASSWORD}", "~*", "&*", "+@all"]
    server = SecureRedis("--requirepass", PASSWORD, *user, admin_password=PASSWORD, unixsocket=True)
    with running(server) as s:
        yield s


@pytest.fixture(scope="module")
def tls_server(certs: Certs) -> Iterator[SecureRedis]:
    """TLS only, with a password; client certificates not asked for."""
    with running(SecureRedis("--requirepass", PASSWORD, admin_password=PASSWORD, certs=certs)) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(certs: Certs) -> Iterator[SecureRedis]:
    """TLS only, and every client must show a certificate signed by the CA."""
    with running(SecureRedis(certs=certs, client_certs=True)) as s:
        yield s


MODES = ["password", "acl-user", "unix-socket", "tls", "mutual-tls"]


@pytest.fixture
def mode_url(request: pytest.FixtureRequest, certs: Certs) -> str:
    """The FLEET_REDIS_URL of one way of connecting (the test's ``mode`` parameter)."""
    mode: str = request.getfixturevalue("mode")
    if mode in ("password", "acl-user", "unix-socket"):
        server: SecureRedis = request.getfixturevalue("auth_server")
        if mode == "password":
            return f"redis://:{enc(PASSWORD)}@127.0.0.1:{server.port}/0"
        if mode == "acl-user":
            return f"redis://{APP_USER}:{enc(APP_PASSWORD)}@127.0.0.1:{server.port}/0"
        return f"unix://:{enc(PASSWORD)}@{server.socket}?db=0"
    if mode == "tls":
        server = request.getfixturevalue("tls_server")
        # By name (localhost): the host name check runs against the certificate's DNS name.
        return (
            f"rediss://:{enc(PASSWORD)}@localhost:{server.port}/0"
            f"?ssl_ca_certs={certs.ca}&ssl_cert_reqs=required"
        )
    server = request.getfixturevalue("mtls_server")
    return (
        f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs.ca}"
        f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
    )


# -- nodes ---------------------------------------------------------------------------------
STOP_TIMEOUT = 20.0
STOP_HUNG = (
    f"the node did not stop within {STOP_TIMEOUT:.0f} s: one of its loops swallowed its "
    "cancellation (on Python 3.11 asyncio.wait_for, which redis-py uses to write commands, "
    "can do that; Node.stop must cancel again until its tasks are done)"
)


def node_settings(url: str, prefix: str) -> Settings:
    return Settings(
        redis_url=SecretStr(url),
        key_prefix=prefix,
        node_id=f"sec-{uuid.uuid4().hex[:6]}",
        node_ttl=6.0,  # Redis calls time out after 2 s: enough on a loaded machine
        maintenance_interval=0.5,
        close_grace=1.0,
        drain_timeout=0.5,
    )


@asynccontextmanager
async def in_process(url: str, prefix: str) -> AsyncIterator[tuple[Node, httpx.AsyncClient]]:
    """``Node(Settings(redis_url=url))`` (it makes its own client) serving its app."""
    settings = node_settings(url, prefix)
    node = Node(settings)
    app = create_app(settings, node)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            yield node, client
    finally:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await lifespan.__aexit__(None, None, None)
        except TimeoutError:
            raise AssertionError(STOP_HUNG) from None


def node_env(url: str, prefix: str, name: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "FLEET_REDIS_URL": url,
        "FLEET_NODE_ID": name,
        "FLEET_KEY_PREFIX": prefix,
        "FLEET_NODE_TTL": "6",
        "FLEET_MAINTENANCE_INTERVAL": "0.5",
        "FLEET_CLOSE_GRACE": "1",
        "FLEET_DRAIN_TIMEOUT": "1",
        "FLEET_LOG_LEVEL": "debug",  # the password must not show at any level
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def served(url: str, prefix: str, tmp_path: Path) -> Iterator[tuple[NodeProcess, httpx.Client]]:
    """A real ``python -m fleet serve``; stopped with SIGTERM, which must end it cleanly."""
    name = f"served-{uuid.uuid4().hex[:6]}"
    node = NodeProcess(name, free_port(), node_env(url, prefix, name), tmp_path / f"{name}.log")
    node.start()
    try:
        with httpx.Client(base_url=node.url, timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if http.get("/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if not node.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not come up:\n{node.log()[-3000:]}")
                time.sleep(0.05)
            yield node, http
        node.signal(signal.SIGTERM)
        try:
            assert node.wait(STOP_TIMEOUT) == 0, node.log()[-3000:]
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{STOP_HUNG}\n{node.log()[-3000:]}") from None
    finally:
        node.stop()


def wait_http_ready(node: NodeProcess, http: httpx.Client, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while http.get("/ready").status_code != 200:
        if not node.alive() or time.monotonic() > deadline:
            raise AssertionError(f"{node.name} not ready:\n{node.log()[-3000:]}")
        time.sleep(0.05)


def assert_not_ready_for(
    node: NodeProcess, http: httpx.Client, seconds: float = 1.5
) -> httpx.Response:
    """The node answers, stays not ready, and keeps running."""
    deadline = time.monotonic() + seconds
    ready = http.get("/ready")
    while time.monotonic() < deadline:
        ready = http.get("/ready")
        assert ready.status_code == 503, ready.text
        assert node.alive()
        time.sleep(0.1)
    assert ready.json() == {"status": "not_ready", "reason": "redis_unavailable"}
    assert http.get("/health").status_code == 200
    return ready


START_BODY = {"params": {"interval": 0.05}}


def check_session_cycle(http: httpx.Client, call: str = "secured") -> None:
    started = http.post(f"/calls/{call}/sessions", json=START_BODY)
    assert started.status_code == 201, started.text
    sid = started.json()["session_id"]
    assert started.json()["state"] == "running"
    closed = http.delete(f"/calls/{call}/sessions/{sid}", params={"wait": 5})
    assert closed.status_code == 200, closed.text
    assert (closed.json()["state"], closed.json()["end_reason"]) == ("ended", "closed")


async def check_session_cycle_async(http: httpx.AsyncClient, call: str = "secured") -> None:
    started = await http.post(f"/calls/{call}/sessions", json=START_BODY)
    assert started.status_code == 201, started.text
    sid = started.json()["session_id"]
    closed = await http.delete(f"/calls/{call}/sessions/{sid}", params={"wait": 5})
    assert closed.status_code == 200, closed.text
    assert (closed.json()["state"], closed.json()["end_reason"]) == ("ended", "closed")


# -- it works, every way -------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_in_process_node_runs_sessions(
    mode: str, mode_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with in_process(mode_url, prefix) as (node, http):
        await wait_ready(node, timeout=10)
        await check_session_cycle_async(http)
        metrics = (await http.get("/metrics")).text
    assert "connected to Redis at" in caplog.text
    # (A loaded machine may time out a first attempt: a warning, never an error.)
    assert not [r for r in caplog.records if r.name == "fleet.redis" and r.levelno >= logging.ERROR]
    assert_no_secret(caplog.text + metrics)
    assert mode_url not in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_served_node_runs_sessions(mode: str, mode_url: str, prefix: str, tmp_path: Path) -> None:
    with served(mode_url, prefix, tmp_path) as (node, http):
        wait_http_ready(node, http)
        check_session_cycle(http)
        metrics = http.get("/metrics").text
    log = node.log()
    assert "connected to Redis at" in log
    assert not re.search(r"ERROR +fleet\.redis", log), log
    assert_no_secret(log + metrics)


# -- failures are clear, bounded, and keep the secret --------------------------------------
def bad_url(case: str, auth: SecureRedis, tls: SecureRedis, mtls: SecureRedis, ca: Path) -> str:
    return {
        "wrong-password": f"redis://:{enc(WRONG_PASSWORD)}@127.0.0.1:{auth.port}/0",
        "wrong-user-password": f"redis://{APP_USER}:{enc(WRONG_PASSWORD)}@127.0.0.1:{auth.port}/0",
        "no-password": f"redis://127.0.0.1:{auth.port}/0",
        "plain-to-tls-port": f"redis://:{enc(PASSWORD)}@127.0.0.1:{tls.port}/0",
        "unknown-ca": f"rediss://:{enc(PASSWORD)}@127.0.0.1:{tls.port}/0",
        "no-client-cert": f"rediss://127.0.0.1:{mtls.port}/0?ssl_ca_certs={ca}",
        "tls-to-plain-port": f"rediss://:{enc(PASSWORD)}@127.0.0.1:{auth.port}/0",
    }[case]


FAILURES = {
    "wrong-password": "authentication failed",
    "wrong-user-password": "authentication failed",
    "no-password": "authentication failed",
    "plain-to-tls-port": "use a rediss:// URL",
    "unknown-ca": "TLS certificate verification failed",
    "no-client-cert": "set ssl_certfile and ssl_keyfile",
    "tls-to-plain-port": "is it the server's tls-port?",
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_in_process_node_with_a_bad_connection_stays_unready(
    case: str,
    auth_server: SecureRedis,
    tls_server: SecureRedis,
    mtls_server: SecureRedis,
    certs: Certs,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = bad_url(case, auth_server, tls_server, mtls_server, certs.ca)
    async with in_process(url, prefix) as (node, http):
        await asyncio.sleep(1.5)
        assert node.readiness() == (False, "redis_unavailable")
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not_ready", "reason": "redis_unavailable"}
        assert (await http.get("/health")).status_code == 200
        refused = await http.post("/calls/c/sessions", json=START_BODY)
        assert refused.status_code == 503 and refused.json()["code"] == "not_ready"
        metrics = (await http.get("/metrics")).text
    lines = [r for r in caplog.records if r.name == "fleet.redis" and "cannot connect" in r.message]
    assert lines, caplog.text
    assert FAILURES[case] in lines[0].message
    # Once per problem, not once per retry (it retries every 250 ms).
    assert len({r.message for r in lines}) == len(lines) <= 2, [r.message for r in lines]
    assert_no_secret(caplog.text + metrics + ready.text)


def test_served_node_with_a_wrong_password_stays_up_and_says_why(
    auth_server: SecureRedis, prefix: str, tmp_path: Path
) -> None:
    url = f"redis://{APP_USER}:{enc(WRONG_PASSWORD)}@127.0.0.1:{auth_server.port}/0"
    with served(url, prefix, tmp_path) as (node, http):
        ready = assert_not_ready_for(node, http)
        refused = http.post("/calls/c/sessions", json=START_BODY)
        assert refused.status_code == 503, refused.text
        metrics = http.get("/metrics").text
    log = node.log()
    assert "cannot connect to Redis at 127.0.0.1" in log
    assert "authentication failed" in log and "FLEET_REDIS_URL" in log
    assert "Traceback" not in log
    assert_no_secret(log + metrics + ready.text, WRONG_PASSWORD, APP_PASSWORD)


def test_served_node_recovers_once_the_password_is_right(
    tls_server: SecureRedis, certs: Certs, prefix: str, tmp_path: Path
) -> None:
    """The password changes on the server (say, a rotation the node got first): the node
    that could not log in becomes ready by itself, and says so."""
    new_password = f"new:{secrets.token_hex(8)}"
    url = f"rediss://:{enc(new_password)}@localhost:{tls_server.port}/0?ssl_ca_certs={certs.ca}"
    with served(url, prefix, tmp_path) as (node, http):
        assert_not_ready_for(node, http, seconds=0.5)
        set_requirepass(tls_server, PASSWORD, new_password)
        try:
            wait_http_ready(node, http)
            check_session_cycle(http)
        finally:
            set_requirepass(tls_server, new_password, PASSWORD)
    log = node.log()
    assert re.search(r"connected to Redis at localhost:\d+ .*after \d+ failed attempts", log), log
    assert_no_secret(log, new_password)


# -- URLs that cannot work stop the node at once -------------------------------------------
CONFIG_ERRORS = {
    "redis://:s3cret@h/0?ssl_ca_certs=/x": "ssl_ca_certs is a TLS option: it needs a rediss://",
    "unix://:s3cret@/tmp/r.sock?ssl_certfile=/x": "needs a rediss:// URL",
    "rediss://:s3cret@h/0?ssl_ca_cert=/x": "unknown option 'ssl_ca_cert'",
    "rediss://:s3cret@h/0?ssl_ca_certs=/nonexistent/ca.crt": "ssl_ca_certs: no such file",
    "rediss://:s3cret@h/0?ssl_cert_reqs=maybe": "ssl_cert_reqs must be one of",
    "rediss://:s3cret@h/0?ssl_keyfile=/etc/hostname": "ssl_keyfile without ssl_certfile",
    "redis://s3cret@h/0": "a user name without a password",
    "http://:s3cret@h/0": "the scheme must be redis://, rediss:// (TLS), unix://, redis+",
    "unix://:s3cret@/tmp/r.sock?socket_keepalive=true": "unknown option 'socket_keepalive'",
    "redis://:s3cret@h/0?db=zero": "Invalid value for 'db'",
    "redis://:s3cret@h/0?decode_responses=false": "unknown option 'decode_responses'",
}


@pytest.mark.parametrize("url", list(CONFIG_ERRORS))
def test_a_url_that_cannot_work_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        connect(Settings(redis_url=SecretStr(url)))
    assert caught.value.detail.startswith("FLEET_REDIS_URL: ")
    assert CONFIG_ERRORS[url] in caught.value.detail
    assert "s3cret" not in caught.value.detail


def test_a_key_that_does_not_match_its_certificate_is_a_config_error(certs: Certs) -> None:
    url = (
        f"rediss://h/0?ssl_ca_certs={certs.ca}"
        f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.server_key}"
    )
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        connection_options(url)


def test_fleet_serve_refuses_a_bad_url_without_showing_it(tmp_path: Path) -> None:
    env = node_env(f"rediss://:{enc(PASSWORD)}@h/0?ssl_ca_cert=/x", "p", "n")
    done = subprocess.run(
        [sys.executable, "-m", "fleet", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "FLEET_REDIS_URL: unknown option 'ssl_ca_cert'" in done.stderr
    assert_no_secret(done.stdout + done.stderr)


def test_url_options_timeouts_and_description() -> None:
    options = connection_options(f"redis://{APP_USER}:{enc(APP_PASSWORD)}@r.example:6380/2", 9)
    assert (options["host"], options["port"], options["db"]) == ("r.example", 6380, 2)
    assert (options["username"], options["password"]) == (APP_USER, APP_PASSWORD)
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 3.0
    assert options["health_check_interval"] == 9 and options["decode_responses"] is True
    description = describe(options)
    assert description == "r.example:6380 (db 2, ACL user)"
    assert APP_USER not in description
    mine = connection_options("redis://h/0?socket_timeout=0.75&max_connections=7")
    assert mine["socket_timeout"] == 0.75 and mine["max_connections"] == 7
    tls = connection_options("rediss://:pw@h:6380/0?ssl_cert_reqs=none")
    assert describe(tls) == "h:6380 (db 0, TLS without certificate verification, password)"
    unix = connection_options("unix:///run/redis.sock?db=3")
    assert describe(unix) == "unix socket /run/redis.sock (db 3)"


# -- the minimal ACL of docs/redis.md ------------------------------------------------------
def documented_acl() -> list[str]:
    """The ``user fleet …`` ACL file line of docs/redis.md, as rule words."""
    text = (ROOT / "docs" / "redis.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("user fleet on >CHANGE-ME ")]
    assert len(lines) == 1, "docs/redis.md must hold exactly one 'user fleet on >CHANGE-ME' line"
    return lines[0].split()[2:]


def test_documented_acl_allows_every_command_of_the_lua_scripts() -> None:
    allowed = {rule[1:].lower() for rule in documented_acl() if rule.startswith("+")}
    called: set[str] = set()
    for script in (ROOT / "fleet" / "store" / "lua").glob("*.lua"):
        called |= {
            c.lower() for c in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)", script.read_text())
        }
    assert called, "no redis.call found in fleet/store/lua"
    assert called <= allowed, f"not in the ACL of docs/redis.md: {sorted(called - allowed)}"
    rules = documented_acl()
    assert "~fleet:*" in rules and "&fleet:*" in rules and "-@all" in rules
    assert not any(r in rules for r in ("~*", "&*", "allkeys", "allchannels", "+@all"))


def test_minimal_acl_runs_a_fleet(tmp_path: Path) -> None:
    """Three nodes as a user with exactly the documented ACL: start, live events across
    nodes, hand-off on SIGTERM, failover after SIGKILL and close; Redis denies nothing."""
    app_password = f"acl-{secrets.token_hex(8)}"
    rules = [f">{app_password}" if r == ">CHANGE-ME" else r for r in documented_acl()]
    admin = ["--user", "default", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    server = SecureRedis(*admin, "--user", "fleet", *rules, admin_password=PASSWORD)
    with running(server):
        server.fleet_url = f"redis://fleet:{app_password}@127.0.0.1:{server.port}/0"
        with LocalFleet(
            3,
            redis=server,
            FLEET_KEY_PREFIX="fleet",
            FLEET_NODE_TTL="2",
            FLEET_DRAIN_TIMEOUT="0.5",
        ) as fleet:
            first, second, third = fleet.nodes
            # Live events, read from another node than the one running the session.
            short = fleet.start("acl", first, params={"limit": 3, "interval": 0.02})
            events = read_sse(fleet, second, f"/calls/acl/sessions/{short['session_id']}/events")
            assert [e for e in events if e.startswith("event: ")][-1] == "event: session_ended"
            # Hand-off on SIGTERM, then failover after SIGKILL, then close.
            sid = fleet.start("acl", first, **START_BODY)["session_id"]
            first.signal(signal.SIGTERM)
            moved = fleet.wait_session(
                "acl", sid, via=second, timeout=15, resumed_count=1, state="running"
            )
            assert moved["node_id"] != first.name
            assert first.wait(15) == 0
            owner = fleet.node_named(moved["node_id"])
            survivor = third if owner is second else second
            owner.stop()  # SIGKILL
            fleet.wait_session(
                "acl", sid, via=survivor, timeout=15, node_id=survivor.name, resumed_count=2
            )
            closed = fleet.request("DELETE", f"/calls/acl/sessions/{sid}?wait=5", survivor)
            assert closed.status_code == 200 and closed.json()["end_reason"] == "closed"
            logs = "\n".join(node.log() for node in fleet.nodes)
        with server.admin() as client:
            denied = client.acl_log()
        assert denied == [], json.dumps(denied, default=str)[:2000]
        assert "NOPERM" not in logs and "CLIENT UNBLOCK is not available" not in logs
        assert_no_secret(logs, app_password)


def read_sse(fleet: LocalFleet, node: NodeProcess, path: str) -> list[str]:
    lines: list[str] = []
    with fleet.http.stream("GET", node.url + path, timeout=10) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(line)
    return lines


# -- the client itself ---------------------------------------------------------------------
async def test_client_reports_a_lost_and_regained_connection(
    auth_server: SecureRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """One line when connections start failing, one when they work again."""
    caplog.set_level(logging.INFO, logger="fleet.redis")
    url = f"redis://:{enc(PASSWORD)}@127.0.0.1:{auth_server.port}/0"
    client: AsyncRedis = connect(Settings(redis_url=SecretStr(url)))
    try:
        assert await client.ping()
        set_requirepass(auth_server, PASSWORD, WRONG_PASSWORD)
        try:
            with auth_server.admin() as admin:
                admin.client_kill_filter(_type="normal", skipme=False)
            for _ in range(3):
                with pytest.raises(redis.exceptions.ConnectionError):  # then Authentication…
                    await client.ping()
        finally:
            set_requirepass(auth_server, WRONG_PASSWORD, PASSWORD)
        assert await client.ping()
    finally:
        await client.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "fleet.redis"]
    failed = [m for m in messages if m.startswith("cannot connect")]
    assert len(failed) == 1 and "authentication failed" in failed[0], messages
    assert any("after" in m and "failed attempts" in m for m in messages), messages
    assert_no_secret("\n".join(messages))
