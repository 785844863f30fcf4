"""FastAPI dependencies, as ``Annotated`` aliases. The permission hooks are plain
dependencies: a deployer replaces them with ``app.dependency_overrides``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from fleet.node import Node
from fleet.settings import ID_PATTERN


async def get_node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]

CallId = Annotated[
    str, Path(pattern=ID_PATTERN, description="A grouping key chosen by the client.")
]
SessionId = Annotated[str, Path(pattern=ID_PATTERN)]
