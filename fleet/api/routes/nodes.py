"""Nodes and workers: the live members of the fleet, and the named workers they run."""

from __future__ import annotations

import json

from fastapi import APIRouter

from fleet.api.auth import PrincipalDep
from fleet.api.deps import NodeDep
from fleet.models import NodeList, WorkerInfo, WorkerList

router = APIRouter(tags=["nodes"])


@router.get("/nodes", response_model=NodeList, responses={401: {"description": "No token."}})
async def list_nodes(node: NodeDep, principal: PrincipalDep) -> NodeList:
    """Any authenticated principal may see the fleet's nodes (no tenant data)."""
    return NodeList(nodes=await node.registry.live_nodes())


@router.get("/workers", response_model=WorkerList, responses={401: {"description": "No token."}})
async def list_workers(node: NodeDep, principal: PrincipalDep) -> WorkerList:
    """The named workers the live nodes run, in the order the nodes name them (a node's
    default first): what each is, its params' JSON schema, and which nodes run it. Any
    authenticated principal may read it."""
    nodes = await node.registry.live_nodes()
    catalog = await node.registry.worker_catalog()
    running: dict[str, list[str]] = {}
    for member in sorted(nodes, key=lambda n: n.node_id != node.node_id):  # this node first
        for name in member.workers:
            running.setdefault(name, []).append(member.node_id)
    workers = []
    for name, node_ids in running.items():
        local = node.workers.get(name)
        described = local.describe() if local is not None else _described(catalog.get(name))
        workers.append(WorkerInfo(**{**described, "name": name, "nodes": sorted(node_ids)}))
    return WorkerList(workers=workers)


def _described(raw: str | None) -> dict[str, object]:
    """A worker as the nodes that run it described it; a worker whose description Redis
    lost (it is written again on the next start or data loss) shows the defaults."""
    blank: dict[str, object] = {
        "description": "",
        "resumable": True,
        "migratable": False,
        "inbox": "queue",
        "params_schema": None,
    }
    if raw is None:
        return blank
    try:
        return {**blank, **json.loads(raw)}
    except ValueError:
        return blank
