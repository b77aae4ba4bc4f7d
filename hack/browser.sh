#!/usr/bin/env bash
# Installs what the browser test of the delivery log page (tests/browser/page.py, run by the e2e
# test web_page::) needs, idempotently, like hack/receivers.sh:
#   chromium                     Debian's package (apt-get, needs root), unless one is installed
#   tests/browser/.venv          Python venv with playwright (requirements.txt); it drives the
#                                system chromium through executable_path: no `playwright install`
#   tests/browser/node_modules   axe-core (npm ci from package-lock.json), injected into the page
# Each part is redone only when its inputs change (a .hookrelay-stamp file holds their hash).
#
# Afterwards:
#   tests/browser/.venv/bin/python tests/browser/page.py --help
set -euo pipefail
cd "$(dirname "$0")/../tests/browser"
DIR=$(pwd)

say() { printf 'browser: %s\n' "$*"; }
die() { printf 'browser: error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=hack/lib/deps.sh
. "$DIR/../../hack/lib/deps.sh"

# --- chromium -------------------------------------------------------------------------------
CHROMIUM=${HOOKRELAY_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ]; then
    [ "$(id -u)" = 0 ] || die "chromium is missing and installing it needs root: run 'apt-get install -y chromium' as root (or set HOOKRELAY_CHROMIUM to a chromium binary)"
    command -v apt-get >/dev/null 2>&1 || die "chromium is missing and there is no apt-get: install chromium, or set HOOKRELAY_CHROMIUM"
    say "installing Debian's chromium (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    CHROMIUM=$(command -v chromium) || die "apt-get installed no chromium binary"
fi
say "chromium: $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null | head -1))"

ensure_venv playwright.sync_api
ensure_node_modules node_modules/axe-core/axe.min.js
