"""What the chart tests share: where the chart is, the value sets they render, running
helm, and reading the manifests it prints. The `helm` and `render` fixtures are in
conftest.py.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleet"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
TRIAL_VALUES = CHART / "ci" / "trial-values.yaml"
POOLS_VALUES = CHART / "ci" / "pools-values.yaml"

# Kubernetes versions the rendered manifests must be valid for (kubernetes-validate
# ships the schemas); the chart's kubeVersion is >=1.27.
KUBE_VERSIONS = ["1.29.0", "1.31.0", "1.35.0"]

# kubernetes-validate ships no schemas for the Prometheus Operator's CRDs, so these kinds
# are left out of schema validation on purpose; test_prometheus_rule_* and
# test_service_monitor_* check them instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# A 16+ character token, as the chart and fleet require.
TOKEN = "deploy-test-token-0123456789"

# Default values plus the least production needs: a Redis and an API key.
MINIMAL = ("--set", "redis.url=redis://redis:6379/0", "--set", f"auth.apiKeys.admin={TOKEN}")
# No values at all: a trial with the chart's own Redis and a generated key.
NO_VALUES: tuple[str, ...] = ()
TRIAL = ("-f", str(TRIAL_VALUES))
PRODUCTION = ("-f", str(PRODUCTION_VALUES))
POOLS = ("-f", str(POOLS_VALUES))
# Every optional feature at once, so that validation sees each template branch.
EVERYTHING = (
    "--set", "redis.trial.enabled=true",
    "--set", f"auth.apiKeys.admin={TOKEN}",
    "--set", f"auth.apiKeys.frontend={TOKEN}-2",
    "--set", "autoscaling.enabled=true",
    "--set", "autoscaling.sessionsPerPod=100",
    "--set", "podDisruptionBudget.minAvailable=1",
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "networkPolicy.enabled=true",
    "--set", "networkPolicy.egress.enabled=true",
    "--set", "networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.team=edge",
    "--set", "networkPolicy.egress.extraEgress[0].ports[0].port=443",
    "--set", "fleet.maxSessions=1000",
    "--set", "fleet.maxSessionsPerCall=2",
    "--set", "fleet.maxSessionsPerNode=100",
    "--set", "fleet.maxSessionDuration=3600",
    "--set", "fleet.idleTimeout=300",
    "--set", "fleet.worker=myapp.workers:Agent",
    "--set", "fleet.extraConfig.FLEET_MAX_BODY_BYTES=131072",
    "--set", "extraEnv[0].name=EXTRA",
    "--set-string", "extraEnv[0].value=1",
    "--set", "image.digest=sha256:" + "a" * 64,
    "--set", "priorityClassName=high",
    "--set", "imagePullSecrets[0].name=regcred",
    "--set", "topologySpreadConstraints[0].maxSkew=2",
    "--set", "topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname",
    "--set", "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
    "--set", "pools.gpu.workers.voice=myapp.voice:Agent",
    "--set", "pools.gpu.workers.echo=myapp.echo:Agent",
    "--set", "pools.gpu.defaultWorker=voice",
    "--set", "pools.gpu.nodeSelector.gpu=yes",
    "--set", "pools.gpu.tolerations[0].key=gpu",
    "--set", "pools.gpu.tolerations[0].operator=Exists",
    "--set", "pools.gpu.autoscaling.maxReplicas=3",
    "--set", "pools.gpu.podDisruptionBudget.maxUnavailable=50%",
    "--set", "pools.gpu.config.FLEET_WORKERS=1",
    "--set", "pools.gpu.env[0].name=CUDA_VISIBLE_DEVICES",
    "--set-string", "pools.gpu.env[0].value=0",
)  # fmt: skip

RENDERS = {
    "minimal": MINIMAL,
    "no-values": NO_VALUES,
    "trial": TRIAL,
    "production": PRODUCTION,
    "pools": POOLS,
    "everything": EVERYTHING,
}

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]


def find_helm() -> str | None:
    local = REPO / ".ci" / "bin" / "helm"
    return str(local) if local.is_file() else shutil.which("helm")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def only(manifests: Sequence[Manifest], kind: str, name: str = "fleet") -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(manifests: Sequence[Manifest], deployment: str = "fleet") -> Manifest:
    spec: Manifest = only(manifests, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def fleet_container(manifests: Sequence[Manifest], deployment: str = "fleet") -> Manifest:
    containers: list[Manifest] = pod_spec(manifests, deployment)["containers"]
    return next(c for c in containers if c["name"] == "fleet")


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_data(manifests: Sequence[Manifest], name: str = "fleet") -> dict[str, str]:
    """The data of a rendered Secret, decoded."""
    data: dict[str, str] = only(manifests, "Secret", name)["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def values() -> Manifest:
    loaded: Manifest = yaml.safe_load(CHART.joinpath("values.yaml").read_text())
    return loaded
