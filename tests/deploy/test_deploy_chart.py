"""The Helm chart: lint, render, validate against Kubernetes schemas, and the promises an
operator relies on (probes, drain budget, security, one source for the alert rules, a
trial from no values at all). Pools are in test_deploy_chart_pools.py.

helm is required, never skipped: `bash .ci/install-helm.sh` puts it in .ci/bin/helm.
"""

from __future__ import annotations

import base64
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    CRD_KINDS,
    EVERYTHING,
    KUBE_VERSIONS,
    MINIMAL,
    NO_VALUES,
    POOLS,
    POOLS_VALUES,
    PRODUCTION,
    PRODUCTION_VALUES,
    RENDERS,
    REPO,
    TOKEN,
    TRIAL,
    TRIAL_VALUES,
    Manifest,
    Render,
    env_of,
    fleet_container,
    only,
    run_helm,
    secret_data,
    values,
)

OPS_ALERTS = REPO / "ops" / "prometheus" / "alerts.yaml"


# ---- lint and refusal -------------------------------------------------------------


@pytest.mark.parametrize("name", ["minimal", "no-values", "trial", "production", "pools"])
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *RENDERS[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "redis.trial.enabled=false"), "fleet needs a Redis"),
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
    ids=["no-redis", "two-redis", "short-grace", "short-token", "zero-workers",
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


# ---- a trial from no values ---------------------------------------------------------


def test_no_values_install_a_trial(render: Render) -> None:
    manifests = render(*NO_VALUES)
    env = env_of(fleet_container(manifests))

    redis_service = only(manifests, "Service", "fleet-redis")
    assert only(manifests, "Deployment", "fleet-redis")["spec"]["replicas"] == 1
    port = redis_service["spec"]["ports"][0]["port"]
    assert env["FLEET_REDIS_URL"] == {
        "name": "FLEET_REDIS_URL",
        "value": f"redis://fleet-redis:{port}/0",
    }

    data = secret_data(manifests)
    token = data["admin-token"]
    assert re.fullmatch(r"[A-Za-z0-9]{32}", token), token
    assert data == {"FLEET_API_KEYS": f"admin:{token}", "admin-token": token}
    ref = {"name": "fleet", "key": "FLEET_API_KEYS"}
    assert env["FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"] == ref
    test_pod = only(manifests, "Pod", "fleet-test")["spec"]["containers"][0]
    assert env_of(test_pod)["FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"] == ref
    assert only(manifests, "ConfigMap")["data"]["FLEET_ALLOW_UNAUTHENTICATED"] == "false"


def test_generated_key_is_random(helm: str) -> None:
    def token() -> str:
        proc = run_helm(
            helm, "template", "fleet", str(CHART), "--show-only", "templates/secret.yaml"
        )
        assert proc.returncode == 0, proc.stderr
        return secret_data(list(yaml.safe_load_all(proc.stdout)))["admin-token"]

    assert token() != token()


def test_one_generated_key_per_render(render: Render) -> None:
    """The Secret's checksum annotation hashes the token the Secret holds, not a second
    random one: every Deployment of a render carries the same checksum."""
    manifests = render(*POOLS)
    checksums = {
        m["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        for m in manifests
        if m["kind"] == "Deployment" and m["metadata"]["name"] != "fleet-redis"
    }
    assert len(checksums) == 1, checksums
    assert "admin-token" in secret_data(manifests)


@pytest.mark.parametrize(
    ("args", "secret"),
    [
        (MINIMAL, {"FLEET_REDIS_URL": "redis://redis:6379/0", "FLEET_API_KEYS": f"admin:{TOKEN}"}),
        (PRODUCTION, None),
        (("--set", "existingSecret=mine"), None),
        (("--set", "redis.url=redis://r:6379/0", "--set", "auth.allowUnauthenticated=true"),
         {"FLEET_REDIS_URL": "redis://r:6379/0"}),
    ],
    ids=["redis-url-and-keys", "production", "existing-secret", "unauthenticated"],
)  # fmt: skip
def test_production_settings_get_no_trial(
    render: Render, args: tuple[str, ...], secret: dict[str, str] | None
) -> None:
    manifests = render(*args)
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert not {("Deployment", "fleet-redis"), ("Service", "fleet-redis")} & names
    if secret is None:
        assert ("Secret", "fleet") not in names
    else:
        assert secret_data(manifests) == secret


def test_a_redis_without_keys_gets_a_generated_key(render: Render) -> None:
    manifests = render("--set", "redis.url=redis://r:6379/0")
    assert ("Deployment", "fleet-redis") not in {
        (m["kind"], m["metadata"]["name"]) for m in manifests
    }
    data = secret_data(manifests)
    assert data["FLEET_REDIS_URL"] == "redis://r:6379/0"
    assert data["FLEET_API_KEYS"] == f"admin:{data['admin-token']}"


def install_notes(helm: str, *args: str) -> str:
    proc = run_helm(
        helm, "install", "fleet", str(CHART), "--namespace", "fleet", "--dry-run=client", *args
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.partition("\nNOTES:\n")[2]


def test_trial_notes_say_how_to_read_the_key_and_go_to_production(
    helm: str, render: Render
) -> None:
    notes = install_notes(helm)
    assert "THIS IS A TRIAL" in notes
    assert "redis.url" in notes and "auth.apiKeys" in notes
    read = re.search(
        r"TOKEN=\$\(kubectl -n fleet get secret (\S+) -o jsonpath='\{\.data\.([\w-]+)\}' "
        r"\| base64 -d\)",
        notes,
    )
    assert read, notes
    secret = only(render(*NO_VALUES), "Secret", read.group(1))
    assert read.group(2) in secret["data"]
    curl = re.search(r"curl .*-X POST .*/calls/\S+/sessions .*Bearer \$TOKEN", notes)
    assert curl and curl.start() > read.start(), notes


def test_production_notes_do_not_speak_of_a_trial(helm: str) -> None:
    notes = install_notes(helm, *PRODUCTION)
    assert "Pods: 3 to 30" in notes
    assert "TRIAL" not in notes and "admin-token" not in notes


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


# How the README names a key of one pool.
POOL_KEY = "pools.<name>."


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
    pool_keys = {
        POOL_KEY + k for k in schema["properties"]["pools"]["additionalProperties"]["properties"]
    }
    assert {k for k in rows if k.startswith(POOL_KEY)} == pool_keys, (
        "the README's table of pool keys and values.schema.json differ"
    )
    unknown = set(rows) - set(documented_paths(values(), schema)) - pool_keys
    assert not unknown, f"README lists values that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("path", [PRODUCTION_VALUES, TRIAL_VALUES, POOLS_VALUES])
def test_ci_values_only_use_known_keys(path: Path) -> None:
    schema = json.loads(CHART.joinpath("values.schema.json").read_text())
    documented_paths(yaml.safe_load(path.read_text()), schema)
