"""Nodes: the live members of the fleet."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.auth import PrincipalDep
from fleet.api.deps import NodeDep
from fleet.models import NodeList

router = APIRouter(tags=["nodes"])


@router.get("/nodes", response_model=NodeList, responses={401: {"description": "No token."}})
async def list_nodes(node: NodeDep, principal: PrincipalDep) -> NodeList:
    """Any authenticated principal may see the fleet's nodes (no tenant data)."""
    return NodeList(nodes=await node.registry.live_nodes())
