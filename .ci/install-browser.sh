#!/usr/bin/env bash
# Installs the browser the status page tests drive (tests/browser): Debian's headless-capable
# Chromium and its matching chromedriver, from the distribution's own packages, so that
# Selenium never has to download a driver (CI has no route to one). Idempotent: skipped when
# both are already there, so .ci/run can call it on every run. Run as root on Debian bookworm.
# Exits non-zero when either binary is still missing afterwards: in CI the browser tests fail,
# not skip, without them.
set -euo pipefail

say() { echo "== browser: $*"; }

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    say "chromium and chromium-driver already installed"
else
    say "installing chromium and chromium-driver"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
fi

for binary in chromium chromedriver; do
    if ! command -v "$binary" >/dev/null; then
        echo "install-browser: $binary is still missing after the install" >&2
        exit 1
    fi
done
# Debian's /usr/bin/chromium is a launcher script; its dev-shm check may print a shell
# warning on hosts with several /dev/shm mounts. The version line is what matters here.
say "$(chromium --version 2>/dev/null)"
say "$(chromedriver --version)"
