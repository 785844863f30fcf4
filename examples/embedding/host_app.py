"""An app of your own, with its own routes and its own sign-in, serving fleet's API under
/agents. Fleet's routes act for whoever the app says is signed in: each user sees only the
sessions they started. Run it with ``python -m examples.embedding.host_app``."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Cookie, Depends, FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from fleet import Fleet
from fleet.api.auth import Principal
from fleet.settings import Settings

# The app's sign-in: sessions kept in memory, named by a cookie. (A real app checks a
# password or a single sign-on before it signs anyone in.)
SIGNED_IN: dict[str, str] = {}


class Login(BaseModel):
    user: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")


async def current_user(session: Annotated[str | None, Cookie()] = None) -> str:
    """The app's own auth dependency: who is signed in, else 401."""
    user = SIGNED_IN.get(session or "")
    if user is None:
        raise HTTPException(status_code=401, detail="sign in first")
    return user


async def agents_principal(user: Annotated[str, Depends(current_user)]) -> Principal:
    """Who fleet's routes act for: the signed-in user. A principal's name is an id
    (``^[A-Za-z0-9._:-]{1,128}$``); ``Principal(name, admin=True)`` would see everything."""
    return Principal(user)


def build_app(settings: Settings) -> FastAPI:
    fleet = Fleet(settings, principal=agents_principal)
    app = FastAPI(title="Acme", lifespan=fleet.lifespan)
    app.include_router(fleet.router, prefix="/agents")

    @app.post("/login")
    async def login(body: Login, response: Response) -> dict[str, str]:
        session = secrets.token_urlsafe(32)
        SIGNED_IN[session] = body.user
        response.set_cookie("session", session, httponly=True, samesite="lax")
        return {"user": body.user}

    @app.get("/me")
    async def me(user: Annotated[str, Depends(current_user)]) -> dict[str, str]:
        return {"user": user}

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(Settings()), host="127.0.0.1", port=8000)
