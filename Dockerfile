# syntax=docker/dockerfile:1
#
# pyrelay container image: a drop-in for the boky/postfix relay container.
#
#   docker build -t pyrelay:latest .
#   docker run --rm --env-file .env.prod -v pyrelay-spool:/var/spool/pyrelay pyrelay:latest
#
# Any pyrelay command can be run in the image, since the entrypoint is the CLI:
#   docker run --rm --env-file .env.prod pyrelay:latest config
#   docker compose -f compose.production.yaml exec postfix pyrelay queue list

# ---------------------------------------------------------------------------
# Builder: install the project and its dependencies into a self-contained venv.
# All runtime dependencies ship manylinux wheels, so no compiler is needed here;
# the stage exists so that pip, the build backend and the source tree stay out
# of the final image.
# ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# README.md is the package's long description (pyproject.toml `readme`).
# constraints.txt locks every dependency to the versions tested (as .ci/run does).
COPY pyproject.toml README.md constraints.txt ./
COPY pyrelay ./pyrelay
# pip and setuptools are only needed to install; dropping them from the venv
# keeps them (and their CVEs) out of the runtime image.
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -m pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------
# Runtime: the same base image (the venv's interpreter symlinks point at it),
# plus the venv, `nc` and an unprivileged user. No build tools.
# ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="pyrelay" \
      org.opencontainers.image.description="Pure-Python asyncio SMTP relay, a drop-in for the Postfix relay container" \
      org.opencontainers.image.licenses="MIT"

# netcat-openbsd keeps existing compose healthchecks working unchanged:
#   healthcheck: test: ["CMD", "nc", "-z", "localhost", "25"]
# The version is left to the pinned Debian release of the base image: bookworm
# only ever gets security updates of it, and pinning an exact Debian revision
# breaks the build as soon as the mirror drops that revision.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends netcat-openbsd \
    && rm -rf /var/lib/apt/lists/*

# Fixed uid/gid so that spool volumes and bind mounts keep stable ownership
# across image rebuilds (chown -R 10025:10025 on a host directory works).
RUN groupadd --system --gid 10025 pyrelay \
    && useradd --system --uid 10025 --gid pyrelay \
        --home-dir /var/spool/pyrelay --no-create-home \
        --shell /usr/sbin/nologin pyrelay \
    && install -d -o pyrelay -g pyrelay -m 0750 /var/spool/pyrelay

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYRELAY_SPOOL_DIR=/var/spool/pyrelay

# The queue must survive container replacement. Declared after the directory is
# created and chowned, so a fresh named volume starts out owned by pyrelay.
VOLUME /var/spool/pyrelay

# 25 (OpenDLP and most apps) and 587 (boky/postfix users) are both listened on
# by default (PYRELAY_LISTEN). Binding them as the non-root user works because
# Docker (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 inside each
# container's network namespace by default. That does not hold with
# `network_mode: host` or on runtimes that leave the sysctl alone (e.g. plain
# Kubernetes): there, set the sysctl for the pod or set PYRELAY_LISTEN to ports
# >= 1024 (e.g. "0.0.0.0:2525 0.0.0.0:2587") and map them.
EXPOSE 25 587

# pyrelay handles SIGTERM itself (stop listening, finish in-flight work; the
# spool keeps everything else). Give it time: compose sets stop_grace_period.
STOPSIGNAL SIGTERM

# Exits 0 when the listener answers SMTP and the spool is writable.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["pyrelay", "health"]

# Numeric (= pyrelay:pyrelay) so that Kubernetes' runAsNonRoot can verify it.
USER 10025:10025
WORKDIR /var/spool/pyrelay

# Exec form: pyrelay is PID 1 and receives SIGTERM directly (no shell in
# between). With no arguments it runs the relay; arguments select a command.
ENTRYPOINT ["pyrelay"]
CMD []
