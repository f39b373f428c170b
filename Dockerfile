# training-sidecar: watches a FluxGym / kohya-ss sd-scripts run and restarts it when it stalls.
#
#   docker build -t training-sidecar:latest .
#   docker build --build-arg BASE_IMAGE=sidecar-base:bookworm -t training-sidecar:latest .   # offline
#
# Both stages start FROM the same base on purpose: the venv's bin/python is a symlink to the
# base's interpreter (/usr/local/bin/python3 in the official image, /usr/bin/python3 in a Debian
# one), so the venv only works on top of the image it was created in.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# `python3 -m venv`, not `python -m venv`: Debian's python3 has no `python` alias.
RUN python3 -m venv /opt/venv
WORKDIR /src
# Only what the wheel is built from, so edits to tests or CI files keep the layer cache.
COPY pyproject.toml README.md ./
COPY sidecar/ ./sidecar/
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/training-sidecar --version

FROM ${BASE_IMAGE}
# The base's own Debian release provides tini when it lacks one (the official python image
# does); pinning a Debian revision would break the build at every point release. The package
# lists and apt's binary caches (~80 MB on a base without Docker's apt clean-up hook) go in the
# same layer.
# hadolint ignore=DL3008
RUN command -v tini >/dev/null \
    || (apt-get update \
        && apt-get install -y --no-install-recommends tini \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin)
COPY --from=builder /opt/venv /opt/venv

ARG VERSION=dev
ARG REVISION=""
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="training-sidecar" \
      org.opencontainers.image.description="Keeps long GPU training runs (FluxGym / kohya-ss sd-scripts) alive: detects stalls and crashes, resumes from the newest complete checkpoint." \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

# TINI_SUBREAPER: under compose's `init: true` (or `docker run --init`) Docker's own init is
# PID 1 and this tini runs below it; as a subreaper it still reaps the sidecar's orphans and
# does not print its "not running as PID 1" warning.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TINI_SUBREAPER=1

# Non-root, numeric so Kubernetes' runAsNonRoot can verify it without a passwd entry.
# UID 1000 because kill(2) of the trainer's processes (shared PID namespace in Docker Compose,
# shareProcessNamespace in Kubernetes) needs the same UID as the target unless CAP_KILL is
# added, and FluxGym's image runs its trainer as UID/GID 1000; and least privilege in general.
# Change it with `docker run --user UID:GID`, compose `user: "UID:GID"`, Kubernetes
# securityContext.runAsUser, or at build time with --build-arg SIDECAR_UID=... SIDECAR_GID=...
# The output folder the sidecar writes (state ledger, train.sh rewrites) must be writable by it.
ARG SIDECAR_UID=1000
ARG SIDECAR_GID=1000
USER ${SIDECAR_UID}:${SIDECAR_GID}

# /healthz, /readyz and /metrics (SIDECAR_HTTP_PORT; 0 disables them). Documentation only:
# publish it, or let a scraper in the same network reach it, deliberately.
EXPOSE 9477

# `training-sidecar healthcheck` asks /healthz on 127.0.0.1 (with SIDECAR_HTTP_PORT=0 it reads
# the heartbeat file itself): 0 while the loop's heartbeat is recent. Polls are seconds
# apart, so 30 s catches a wedged loop quickly; start-period covers interpreter start and the
# first poll on a slow disk.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["training-sidecar", "healthcheck"]

# tini is PID 1 under plain `docker run`: it forwards SIGTERM (the sidecar then stops its
# trainer before exiting) and reaps zombies. Give `docker stop` more than SIDECAR_KILL_GRACE
# (default 30 s), e.g. `docker stop -t 45` or compose `stop_grace_period: 45s`.
ENTRYPOINT ["tini", "--", "training-sidecar"]
CMD ["run"]
