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

stamp_of() { # stamp_of FILE... -- STRING...: a hash of the files' contents and the strings
    local files=()
    while [ "$1" != "--" ]; do files+=("$1"); shift; done
    shift
    { cat "${files[@]}"; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1
}

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

# --- Python ---------------------------------------------------------------------------------
PYTHON=""
for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        PYTHON=$(command -v "$candidate")
        break
    fi
done
[ -n "$PYTHON" ] || die "no python3 >= 3.10 found"
PY_VERSION=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')

VENV="$DIR/.venv"
want=$(stamp_of requirements.txt -- "python $PY_VERSION")
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.hookrelay-stamp" 2>/dev/null)" = "$want" ] &&
    "$VENV/bin/python" -c 'import playwright.sync_api' 2>/dev/null; then
    say "python venv up to date ($VENV, python $PY_VERSION)"
else
    say "creating python venv $VENV with $PYTHON ($PY_VERSION)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r requirements.txt
    echo "$want" >"$VENV/.hookrelay-stamp"
    say "installed $("$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
        awk '$1 == "playwright" { print $1 "==" $2 }')"
fi

# --- Node (axe-core) ------------------------------------------------------------------------
command -v npm >/dev/null 2>&1 || die "npm not found"
want=$(stamp_of package.json package-lock.json -- "axe")
if [ -f node_modules/axe-core/axe.min.js ] &&
    [ "$(cat node_modules/.hookrelay-stamp 2>/dev/null)" = "$want" ]; then
    say "node_modules up to date ($DIR/node_modules)"
else
    say "npm ci in $DIR"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$want" >node_modules/.hookrelay-stamp
    say "installed axe-core@$(node -p 'require("./node_modules/axe-core/package.json").version')"
fi
