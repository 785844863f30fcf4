"""``fleet serve``: one process under uvicorn, or several under gunicorn (``--workers N``)."""

from __future__ import annotations

import sys

from fleet.settings import Settings


def refuse_open_bind(settings: Settings) -> str | None:
    if (
        settings.binds_publicly()
        and not settings.principals()
        and not settings.allow_unauthenticated
    ):
        return (
            f"refusing to listen on {settings.host} without FLEET_API_KEYS: anyone who can "
            "reach it could start and stop sessions. Set FLEET_API_KEYS, bind to 127.0.0.1, "
            "or set FLEET_ALLOW_UNAUTHENTICATED=true if a trusted proxy guards it."
        )
    return None


def serve(settings: Settings) -> int:
    problem = refuse_open_bind(settings)
    if problem:
        print(f"fleet: {problem}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        if settings.embedded:
            print(
                "fleet: --workers > 1 needs FLEET_REDIS_URL: each process would get an "
                "embedded Redis of its own, and they could not see each other's sessions.",
                file=sys.stderr,
            )
            return 2
        from fleet.serve.multi import run_gunicorn  # gunicorn only when asked for

        return run_gunicorn(settings)
    from fleet.serve.server import run_uvicorn

    return run_uvicorn(settings)
