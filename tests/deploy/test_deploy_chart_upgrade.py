"""The generated API key survives `helm upgrade`: the chart reads it back from the
Secret the release already has (`lookup`). helm runs against a stand-in Kubernetes API
on loopback that answers discovery and holds at most that one Secret, with
`--dry-run=server`, which is how helm lets a render call lookup.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import CHART, REPO, Manifest, only, secret_data

# The kinds the chart renders by default, by group/version, for discovery.
KINDS = {
    "v1": ["ConfigMap", "Pod", "Secret", "Service", "ServiceAccount"],
    "apps/v1": ["Deployment"],
    "policy/v1": ["PodDisruptionBudget"],
    "autoscaling/v2": ["HorizontalPodAutoscaler"],
    "networking.k8s.io/v1": ["NetworkPolicy"],
}
SECRET_PATH = "/api/v1/namespaces/fleet/secrets/fleet"


@dataclass
class FakeApi:
    """What the stand-in API serves: discovery, and the release's Secret if set."""

    secret: Manifest | None = None
    asked: list[str] = field(default_factory=list)

    def answer(self, path: str) -> tuple[int, object]:
        self.asked.append(path)
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv,
                 "version": gv.split("/")[1]}]}
                for gv in KINDS if "/" in gv
            ]  # fmt: skip
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        group_version = path.removeprefix("/api/").removeprefix("/apis/")
        if group_version in KINDS:
            resources = [
                {"name": kind.lower() + ("es" if kind.endswith("s") else "s"),
                 "singularName": kind.lower(), "namespaced": True, "kind": kind,
                 "verbs": ["get", "list"]}
                for kind in KINDS[group_version]
            ]  # fmt: skip
            return 200, {"kind": "APIResourceList", "groupVersion": group_version,
                         "resources": resources}  # fmt: skip
        if path == SECRET_PATH and self.secret is not None:
            return 200, self.secret
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404}  # fmt: skip


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApi, Path]]:
    """The stand-in API and a kubeconfig that points at it."""
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = fake.answer(self.path.partition("?")[0])
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {
                    "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )  # fmt: skip
    try:
        yield fake, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def render_on_cluster(helm: str, kubeconfig: Path, *args: str) -> list[Manifest]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    proc = subprocess.run(
        [helm, "template", "fleet", str(CHART), "--namespace", "fleet", "--dry-run=server",
         "--disable-openapi-validation", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def stored(manifest: Manifest) -> Manifest:
    """The manifest as the cluster holds it once the release "fleet" made it."""
    labels = {**manifest["metadata"].get("labels", {}), "app.kubernetes.io/managed-by": "Helm"}
    annotations = {"meta.helm.sh/release-name": "fleet", "meta.helm.sh/release-namespace": "fleet"}
    metadata = {**manifest["metadata"], "namespace": "fleet", "labels": labels,
                "annotations": annotations}  # fmt: skip
    return {**manifest, "metadata": metadata}


def secret(data: dict[str, str]) -> Manifest:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return stored({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": encoded,
                   "metadata": {"name": "fleet"}})  # fmt: skip


def secret_checksum(manifests: list[Manifest]) -> str:
    deployment = only(manifests, "Deployment")
    checksum: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    return checksum


def test_upgrade_keeps_the_generated_key(helm: str, api: tuple[FakeApi, Path]) -> None:
    fake, kubeconfig = api
    installed = render_on_cluster(helm, kubeconfig)
    assert SECRET_PATH in fake.asked, "the render did not look the Secret up"
    token = secret_data(installed)["admin-token"]

    fake.secret = stored(only(installed, "Secret"))
    upgrades = [render_on_cluster(helm, kubeconfig) for _ in range(2)]
    for upgraded in upgrades:
        assert secret_data(upgraded) == {"FLEET_API_KEYS": f"admin:{token}", "admin-token": token}
    # Same Secret, same checksum: an upgrade that changes nothing restarts no pod.
    assert secret_checksum(upgrades[0]) == secret_checksum(upgrades[1])
    assert secret_checksum(upgrades[0]) == secret_checksum(installed)


def test_keys_chosen_before_are_not_taken_for_a_generated_one(
    helm: str, api: tuple[FakeApi, Path]
) -> None:
    """A release that had auth.apiKeys and drops them gets a new generated key, not the
    old admin token under another name."""
    fake, kubeconfig = api
    fake.secret = secret({"FLEET_API_KEYS": "admin:chosen-token-0123456789"})
    data = secret_data(render_on_cluster(helm, kubeconfig))
    assert data["admin-token"] != "chosen-token-0123456789"
    assert data["FLEET_API_KEYS"] == f"admin:{data['admin-token']}"
