# fleet node image: `fleet serve` under gunicorn with uvicorn workers.
#
#   docker build -t fleet .
#   docker run -p 8000:8000 -e FLEET_REDIS_URL=redis://redis:6379/0 \
#     -e FLEET_API_KEYS=admin:a-token-of-16-or-more-chars fleet

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: build the wheel and install it with its dependencies into a venv ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# .dockerignore lets in only what the package build needs.
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install /wheels/*.whl \
    && fleet --help > /dev/null

# ---- runtime: the venv on a clean base, no compilers, no build tree, non-root ----
FROM ${PYTHON_IMAGE} AS runtime

ARG FLEET_UID=10001
RUN groupadd --system --gid ${FLEET_UID} fleet \
    && useradd --system --uid ${FLEET_UID} --gid ${FLEET_UID} --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin fleet \
    && install -d -o ${FLEET_UID} -g ${FLEET_UID} /tmp/fleet-metrics

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLEET_HOST=0.0.0.0 \
    FLEET_PORT=8000 \
    FLEET_WORKERS=2 \
    FLEET_LOG_FORMAT=json \
    PROMETHEUS_MULTIPROC_DIR=/tmp/fleet-metrics \
    XDG_RUNTIME_DIR=/tmp

# XDG_RUNTIME_DIR: gunicorn's control socket goes to /tmp (writable in Kubernetes as an
# emptyDir), not to the user's home, which does not exist.
# Without FLEET_API_KEYS a node refuses to bind 0.0.0.0 unless
# FLEET_ALLOW_UNAUTHENTICATED=true: the image does not open itself to everyone.
USER ${FLEET_UID}:${FLEET_UID}
WORKDIR /tmp
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLEET_PORT', '8000'), timeout=4)"]

# gunicorn drains on SIGTERM (FLEET_DRAIN_TIMEOUT); give `docker stop -t` enough time.
STOPSIGNAL SIGTERM
CMD ["fleet", "serve"]
