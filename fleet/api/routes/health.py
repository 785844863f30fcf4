"""Liveness, readiness and Prometheus metrics: always open, for Kubernetes and scrapers."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from fleet.api.deps import NodeDep

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process and its event loop answer. Never touches Redis."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; the reason says why."}})
async def ready(node: NodeDep) -> JSONResponse:
    """Redis answers, this node's lease is held, and it is not draining."""
    ok, reason = node.readiness()
    if ok:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(node: NodeDep) -> Response:
    node.refresh_gauges()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        payload = generate_latest(registry)
    else:
        payload = generate_latest(REGISTRY)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)
