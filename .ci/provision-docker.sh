#!/usr/bin/env bash
# Provisions what the container tests need on a fresh Debian bookworm machine, as root:
# a running Docker engine and the offline base image. Idempotent: every step is skipped when
# its result is already there, so .ci/run can call it on every run.
# Exits non-zero, with the daemon's last log lines, when the engine cannot be started.
set -euo pipefail
cd "$(dirname "$0")/.."

dockerd_log="${DOCKERD_LOG:-/tmp/dockerd.log}"

say() { echo "== provision: $*"; }

apt_updated=false
apt_install() {
    if [ "$apt_updated" = false ]; then
        apt-get update -qq
        apt_updated=true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. The engine. Debian's docker.io ships dockerd and the client; debootstrap builds the base
#    image below, because no registry can be reached to pull one.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
else
    say "docker.io and debootstrap already installed"
fi

# 2. Start dockerd unless an engine already answers. No init system runs it here.
if docker info >/dev/null 2>&1; then
    say "engine already running: $(docker version --format '{{.Server.Version}}')"
else
    say "starting dockerd in the background (log: $dockerd_log)"
    nohup dockerd >"$dockerd_log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break   # it died: no point in waiting
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "provision: the Docker engine did not start (waited up to 60 s);" \
            "last lines of $dockerd_log:" >&2
        tail -n 30 "$dockerd_log" >&2 || true
        exit 1
    fi
    say "engine started: $(docker version --format '{{.Server.Version}}')"
fi

# 3. The base image the Dockerfile is built FROM in CI (cached by the script itself).
bash .ci/bootstrap-base-image.sh

say "done (Compose v2, hadolint and yamllint come with the test extras: pip install -e '.[test]')"
