"""Pools: Deployments with their own worker sets behind the one Service. Each pool owns
its pods alone (Deployment, budget, autoscaler, spread); the Service, the network
policies and the scrape cover every pool; with no pools the chart is what it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.deploy.chart import (
    CHART,
    MINIMAL,
    POOLS,
    Manifest,
    Render,
    env_of,
    fleet_container,
    only,
    pod_spec,
    run_helm,
    values,
)

# The two pools of ci/pools-values.yaml, with fixed replicas instead of autoscalers.
FIXED = (*POOLS, "--set", "pools.default.autoscaling.enabled=false",
         "--set", "pools.gpu.autoscaling.enabled=false")  # fmt: skip


def deployments(manifests: Sequence[Manifest]) -> dict[str, Manifest]:
    return {
        m["metadata"]["name"]: m
        for m in manifests
        if m["kind"] == "Deployment" and m["metadata"]["name"] != "fleet-redis"
    }


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_two_pools_have_their_own_workers_and_placement(render: Render) -> None:
    manifests = render(*FIXED)
    assert set(deployments(manifests)) == {"fleet", "fleet-gpu"}
    default, gpu = pod_spec(manifests, "fleet"), pod_spec(manifests, "fleet-gpu")

    worker = {name: env_of(fleet_container(manifests, name))["FLEET_WORKER"]["value"]
              for name in ("fleet", "fleet-gpu")}  # fmt: skip
    # The default worker first, as FLEET_WORKER wants it; then the others by name.
    assert worker == {
        "fleet": "support=myapp.support:SupportAgent,coder=myapp.coder:CoderAgent",
        "fleet-gpu": "voice=myapp.voice:VoiceAgent",
    }
    assert "FLEET_WORKER" not in only(manifests, "ConfigMap")["data"]

    assert only(manifests, "Deployment", "fleet")["spec"]["replicas"] == values()["replicaCount"]
    assert only(manifests, "Deployment", "fleet-gpu")["spec"]["replicas"] == 1

    assert "nodeSelector" not in default
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert fleet_container(manifests, "fleet-gpu")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in fleet_container(manifests, "fleet")["resources"]["limits"]

    gpu_env = env_of(fleet_container(manifests, "fleet-gpu"))
    assert gpu_env["FLEET_WORKERS"]["value"] == "1"
    assert "FLEET_WORKERS" not in env_of(fleet_container(manifests, "fleet"))
    # Both pools share the ConfigMap and the Secrets.
    for name in ("fleet", "fleet-gpu"):
        container = fleet_container(manifests, name)
        assert container["envFrom"] == [{"configMapRef": {"name": "fleet"}}]
        assert env_of(container)["FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "fleet"


def test_each_pool_has_its_own_autoscaler(render: Render) -> None:
    manifests = render(*POOLS)
    for deployment in deployments(manifests).values():
        assert "replicas" not in deployment["spec"]
    hpas = {m["metadata"]["name"]: m["spec"] for m in manifests
            if m["kind"] == "HorizontalPodAutoscaler"}  # fmt: skip
    assert set(hpas) == {"fleet", "fleet-gpu"}
    for name, spec in hpas.items():
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": name}  # fmt: skip
    assert (hpas["fleet"]["minReplicas"], hpas["fleet"]["maxReplicas"]) == (2, 20)
    assert (hpas["fleet-gpu"]["minReplicas"], hpas["fleet-gpu"]["maxReplicas"]) == (1, 4)

    def cpu_target(spec: Manifest) -> int:
        (metric,) = spec["metrics"]
        target: int = metric["resource"]["target"]["averageUtilization"]
        return target

    assert cpu_target(hpas["fleet-gpu"]) == 60
    # What a pool leaves out of autoscaling comes from the top level, key by key.
    top = values()["autoscaling"]
    assert cpu_target(hpas["fleet"]) == top["targetCPUUtilizationPercentage"]
    assert hpas["fleet-gpu"]["behavior"] == top["behavior"]


def test_a_pool_can_turn_off_what_the_top_level_turns_on(render: Render) -> None:
    manifests = render(
        *POOLS,
        "--set", "autoscaling.enabled=true",
        "--set", "pools.gpu.autoscaling.enabled=false",
        "--set", "podDisruptionBudget.enabled=true",
        "--set", "pools.gpu.podDisruptionBudget.enabled=false",
    )  # fmt: skip
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert ("HorizontalPodAutoscaler", "fleet") in kinds
    assert ("HorizontalPodAutoscaler", "fleet-gpu") not in kinds
    assert ("PodDisruptionBudget", "fleet-gpu") not in kinds
    assert only(manifests, "Deployment", "fleet-gpu")["spec"]["replicas"] == 1


def test_a_pool_takes_what_it_leaves_out_from_the_top_level(render: Render) -> None:
    manifests = render(
        *MINIMAL,
        "--set", "pools.batch.workers.report=myapp.report:Agent",
        "--set", "nodeSelector.pool=shared",
        "--set", "replicaCount=3",
    )  # fmt: skip
    batch, default = fleet_container(manifests, "fleet-batch"), fleet_container(manifests)
    assert batch["resources"] == default["resources"] == values()["resources"]
    assert pod_spec(manifests, "fleet-batch")["nodeSelector"] == {"pool": "shared"}
    assert only(manifests, "Deployment", "fleet-batch")["spec"]["replicas"] == 3
    assert env_of(batch)["FLEET_WORKER"]["value"] == "report=myapp.report:Agent"
    assert "FLEET_WORKER" not in env_of(default)


def test_one_service_selects_every_pool_and_nothing_else(render: Render) -> None:
    manifests = render(*POOLS)
    selector = only(manifests, "Service")["spec"]["selector"]
    for deployment in deployments(manifests).values():
        assert selects(selector, pod_labels(deployment)), deployment["metadata"]["name"]
    others = [
        pod_labels(only(manifests, "Deployment", "fleet-redis")),
        only(manifests, "Pod", "fleet-test")["metadata"]["labels"],
    ]
    for labels in others:
        assert not selects(selector, labels)


def test_each_pool_owns_its_pods_alone(render: Render) -> None:
    """No Deployment, PodDisruptionBudget or spread constraint of one pool selects the
    pods of another: autoscalers would count them, and a pod under two budgets cannot be
    evicted."""
    manifests = render(*POOLS)
    pools = deployments(manifests)
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == set(pools)
    for name, deployment in pools.items():
        labels = pod_labels(deployment)
        assert labels["fleet/pool"] == ("default" if name == "fleet" else "gpu")
        owners = [n for n, d in pools.items()
                  if selects(d["spec"]["selector"]["matchLabels"], labels)]  # fmt: skip
        assert owners == [name]
        under = [b["metadata"]["name"] for b in budgets
                 if selects(b["spec"]["selector"]["matchLabels"], labels)]  # fmt: skip
        assert under == [name]
        for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            assert (
                constraint["labelSelector"]["matchLabels"]
                == (deployment["spec"]["selector"]["matchLabels"])
            )


def test_network_policies_and_scrape_cover_every_pool(render: Render) -> None:
    manifests = render(
        *POOLS,
        "--set", "networkPolicy.enabled=true",
        "--set", "networkPolicy.egress.enabled=true",
        "--set", "monitoring.serviceMonitor.enabled=true",
    )  # fmt: skip
    policy = only(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    redis_policy = only(manifests, "NetworkPolicy", "fleet-redis")["spec"]
    redis_peer = redis_policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    monitor = only(manifests, "ServiceMonitor")["spec"]
    for deployment in deployments(manifests).values():
        labels = pod_labels(deployment)
        assert selects(policy, labels)
        assert selects(redis_peer, labels)
        for key in monitor["podTargetLabels"]:
            assert key in labels
    assert monitor["podTargetLabels"] == ["fleet/pool"]
    assert selects(
        monitor["selector"]["matchLabels"], only(manifests, "Service")["metadata"]["labels"]
    )


# ---- the default pool is the chart from before pools ------------------------------


def test_default_render_keeps_its_names_and_selectors(render: Render) -> None:
    """Selectors of Deployments are immutable: these are the ones releases from before
    pools have, and an upgrade must find them unchanged."""
    manifests = render(*MINIMAL)
    assert {(m["kind"], m["metadata"]["name"]) for m in manifests} == {
        ("ConfigMap", "fleet"), ("Deployment", "fleet"), ("PodDisruptionBudget", "fleet"),
        ("Pod", "fleet-test"), ("Secret", "fleet"), ("Service", "fleet"),
        ("ServiceAccount", "fleet"),
    }  # fmt: skip
    node = {
        "app.kubernetes.io/name": "fleet",
        "app.kubernetes.io/instance": "fleet",
        "app.kubernetes.io/component": "node",
    }
    assert only(manifests, "Deployment")["spec"]["selector"]["matchLabels"] == node
    assert only(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == node
    assert only(manifests, "Service")["spec"]["selector"] == node
    labels = pod_labels(only(manifests, "Deployment"))
    assert (labels["fleet/pool"], labels["fleet/node"]) == ("default", "true")

    production = render(*MINIMAL, "--set", "autoscaling.enabled=true")
    names = {(m["kind"], m["metadata"]["name"]) for m in production}
    assert ("HorizontalPodAutoscaler", "fleet") in names


def test_the_default_pool_spelled_out_changes_nothing(render: Render) -> None:
    top = values()
    spelled = render(
        *MINIMAL,
        "--set", f"pools.default.replicas={top['replicaCount']}",
        "--set", f"pools.default.autoscaling.maxReplicas={top['autoscaling']['maxReplicas']}",
        "--set", "pools.default.enabled=true",
    )  # fmt: skip
    assert spelled == render(*MINIMAL)


def test_the_default_pool_can_be_left_out(render: Render) -> None:
    manifests = render(
        *MINIMAL,
        "--set", "pools.default.enabled=false",
        "--set", "pools.cpu.workers.support=myapp.support:Agent",
    )  # fmt: skip
    assert set(deployments(manifests)) == {"fleet-cpu"}
    selector = only(manifests, "Service")["spec"]["selector"]
    assert selects(selector, pod_labels(only(manifests, "Deployment", "fleet-cpu")))
    assert selector["fleet/node"] == "true"


# ---- what the chart refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "pools.GPU.replicas=1"), "does not match pattern"),
        (("--set", "pools.gpu_1.replicas=1"), "does not match pattern"),
        (("--set", "pools.-gpu.replicas=1"), "does not match pattern"),
        (("--set", "pools." + "g" * 31 + ".replicas=1"), "does not match pattern"),
        (("--set", "pools.gpu.workers.voice=no-attr"), "does not match pattern"),
        (("--set", "pools.gpu.workers.a=m:A", "--set", "pools.gpu.workers.b=m:B"),
         "set pools.gpu.defaultWorker"),
        (("--set", "pools.gpu.workers.a=m:A", "--set", "pools.gpu.defaultWorker=b"),
         "is not one of pools.gpu.workers"),
        (("--set", "pools.gpu.replicas=-1"), "minimum"),
        (("--set", "pools.gpu.size=2"), "size"),
        (("--set", "pools.redis.replicas=1"), "taken by the trial Redis"),
        (("--set", "pools.default.enabled=false"), "enable at least one"),
        (("--set", "pools.gpu.config.FLEET_DRAIN_TIMEOUT=300"), "same in every pool"),
        (("--set", "pools.gpu.config.FLEET_WORKER=m:A"), "pools.gpu.workers"),
        (("--set", "extraEnv[0].name=TZ", "--set", "pools.gpu.env[0].name=TZ"), "TZ twice"),
        (("--set", "fullnameOverride=" + "f" * 60, "--set", "pools.gpu.replicas=1"),
         "longer than 63"),
    ],
    ids=["upper-case", "underscore", "leading-dash", "too-long", "bad-worker",
         "no-default-worker", "unknown-default-worker", "negative-replicas", "unknown-key",
         "redis", "none-enabled", "chart-wide-setting", "worker-as-config", "env-twice",
         "long-name"],
)  # fmt: skip
def test_render_refuses_pools_that_cannot_work(
    helm: str, args: tuple[str, ...], message: str
) -> None:
    proc = run_helm(helm, "template", "fleet", str(CHART), *args)
    assert proc.returncode != 0, "helm template should have failed"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "worker",
    ["myapp.agents:Agent", "support=myapp.support:Agent", "a=m.a:A,b=m.b:B", "a=m.a:A, b=m.b:B"],
)
def test_fleet_worker_takes_every_form_of_fleet_worker(render: Render, worker: str) -> None:
    manifests = render(*MINIMAL, "--set-string", "fleet.worker=" + worker.replace(",", "\\,"))
    assert only(manifests, "ConfigMap")["data"]["FLEET_WORKER"] == worker


def test_one_default_worker_for_every_pool(helm: str, render: Render) -> None:
    data = only(render(*FIXED, "--set", "fleet.defaultWorker=support"), "ConfigMap")["data"]
    assert data["FLEET_DEFAULT_WORKER"] == "support"
    assert "FLEET_DEFAULT_WORKER" not in only(render(*FIXED), "ConfigMap")["data"]
    refused = run_helm(
        helm, "template", "fleet", str(CHART), *FIXED, "--set", "fleet.defaultWorker=no spaces"
    )
    assert refused.returncode != 0 and "defaultWorker" in refused.stderr
