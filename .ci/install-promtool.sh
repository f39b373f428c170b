#!/usr/bin/env bash
# Provides promtool, Prometheus's rule checker, for tests/deploy/test_dashboards_and_alerts.py
# (`promtool check rules`, `promtool test rules`), on Debian bookworm. Idempotent: a promtool on
# PATH, or one this script extracted before, is kept and only its version printed.
#
# It takes promtool out of Debian's `prometheus` package rather than installing the package:
# `apt-get download` + `dpkg-deb -x` into a scratch folder, then only the promtool binary (a Go
# program linked to libc alone) is kept, as .ci/tools/bin/promtool. Installing the package would
# add a Prometheus server, its web assets and a system user that nothing here needs. The tests
# look on PATH first, then in .ci/tools/bin (not committed: .ci/tools/ is in .gitignore).
#
#   bash .ci/install-promtool.sh            # PATH's promtool if there is one, else extract
#   bash .ci/install-promtool.sh --extract  # extract into .ci/tools/bin even with one on PATH
#
# Refreshing the package lists (when the download finds none) needs root, as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

tools_bin=.ci/tools/bin
extracted="$tools_bin/promtool"

say() { echo "== install-promtool: $*"; }

case "${1:-}" in
    "") prefer_path=true ;;
    --extract) prefer_path=false ;;
    *) echo "usage: $0 [--extract]" >&2; exit 2 ;;
esac

show_version() {
    say "using $1"
    "$1" --version 2>&1 | head -n 1
}

if [ "$prefer_path" = true ] && command -v promtool >/dev/null; then
    show_version "$(command -v promtool)"
    exit 0
fi
if [ -x "$extracted" ] && "$extracted" --version >/dev/null 2>&1; then
    show_version "$extracted"
    exit 0
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# apt drops to the _apt user to download; let it write the .deb here (else it warns and
# downloads as root).
chmod 0777 "$scratch"

download() { (cd "$scratch" && apt-get download -qq prometheus); }

if ! download 2>/dev/null; then
    say "no prometheus package in the lists yet: apt-get update"
    apt-get update -qq
    download
fi
package="$(find "$scratch" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)"
if [ -z "$package" ]; then
    echo "install-promtool: apt-get download left no prometheus_*.deb" >&2
    exit 1
fi
say "extracting promtool from $(basename "$package")"
dpkg-deb -x "$package" "$scratch/root"
mkdir -p "$tools_bin"
install -m 0755 "$scratch/root/usr/bin/promtool" "$extracted"
show_version "$extracted"
