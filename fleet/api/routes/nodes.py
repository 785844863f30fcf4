"""Nodes: the live members of the fleet."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.deps import NodeDep
from fleet.models import NodeList

router = APIRouter(tags=["nodes"])


@router.get("/nodes", response_model=NodeList)
async def list_nodes(node: NodeDep) -> NodeList:
    return NodeList(nodes=await node.registry.live_nodes())
