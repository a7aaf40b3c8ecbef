# syntax=docker/dockerfile:1
# One image for every AgentVault Mesh service; the command picks the service:
#   docker run agentvault-mesh agentvault-registry
#   docker run agentvault-mesh agentvault-edge
# No embedded PostgreSQL/Redis and no dev tools: DATABASE_URL and REDIS_URL point at real servers.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: install the project and its dependencies into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# .dockerignore admits only what `pip install .` needs (pyproject, README, libs/, services/).
COPY . .
# Not editable, no extras: the venv must stand alone once /src is gone. pyc files are compiled here,
# because the runtime root filesystem is read-only.
RUN pip install .
# The installer itself is not needed at run time.
RUN pip uninstall --yes pip setuptools \
 && python -m compileall -q /opt/venv

# ---- runtime: the venv and nothing else, run as an unprivileged numeric user ----
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="agentvault-mesh" \
      org.opencontainers.image.description="AgentVault Mesh services (registry, edge, ...); the command selects one" \
      org.opencontainers.image.licenses="Apache-2.0"
# A passwd entry keeps tools that look the user up (getpass, ps) happy; the UID is what Kubernetes checks.
RUN groupadd --system --gid ${APP_UID} agentvault \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin agentvault
COPY --from=build /opt/venv /opt/venv
# Containers listen on every interface; the data dir lives under /tmp (tmpfs/emptyDir) because the
# services keep their state in PostgreSQL and Redis and the root filesystem is mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTVAULT_BIND_HOST=0.0.0.0 \
    AGENTVAULT_DATA_DIR=/tmp/agentvault \
    LOG_FORMAT=json
WORKDIR /tmp
USER ${APP_UID}:${APP_UID}
# registry gRPC, edge HTTP, Prometheus (REGISTRY_METRICS_PORT); later services add theirs.
EXPOSE 50051 50052 50053 8080 9090
# The servers handle SIGTERM themselves (health -> NOT_SERVING, then a graceful stop), so no init or shell
# wrapper is needed; exec-form CMD makes the service PID 1 and the receiver of the signal.
STOPSIGNAL SIGTERM
CMD ["agentvault-registry"]
