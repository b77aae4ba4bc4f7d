#!/usr/bin/env bash
# Installs what the webhook test receivers in tests/receivers/ need, idempotently:
#   tests/receivers/.venv          Python venv with standardwebhooks (requirements.txt, hash-pinned)
#   tests/receivers/node_modules   express, body-parser, standardwebhooks (npm ci from package-lock.json)
# Each part is redone only when its inputs change: a .hookrelay-stamp file inside it holds a hash of
# those inputs (the pin file plus the interpreter's version). Safe to run on a fresh machine and in CI.
#
# Afterwards:
#   tests/receivers/.venv/bin/python tests/receivers/receiver.py --secret S --port 0
#   node tests/receivers/receiver.js --secret S --port 0
set -euo pipefail
cd "$(dirname "$0")/../tests/receivers"
DIR=$(pwd)

say() { printf 'receivers: %s\n' "$*"; }
die() { printf 'receivers: error: %s\n' "$*" >&2; exit 1; }

stamp_of() { # stamp_of FILE... -- STRING...: a hash of the files' contents and the strings
    local files=()
    while [ "$1" != "--" ]; do files+=("$1"); shift; done
    shift
    { cat "${files[@]}"; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1
}

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
    "$VENV/bin/python" -c 'import standardwebhooks' 2>/dev/null; then
    say "python venv up to date ($VENV, python $PY_VERSION)"
else
    say "creating python venv $VENV with $PYTHON ($PY_VERSION)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        --require-hashes -r requirements.txt
    echo "$want" >"$VENV/.hookrelay-stamp"
    say "installed $("$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
        awk '$1 == "standardwebhooks" { print $1 "==" $2 }')"
fi

# --- Node -----------------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node not found"
command -v npm >/dev/null 2>&1 || die "npm not found"
NODE_VERSION=$(node --version)
case "$NODE_VERSION" in
    v1[0-9].* | v[0-9].*) die "node >= 20 needed, found $NODE_VERSION" ;;
esac

want=$(stamp_of package.json package-lock.json -- "node $NODE_VERSION")
if [ -d node_modules ] && [ "$(cat node_modules/.hookrelay-stamp 2>/dev/null)" = "$want" ]; then
    say "node_modules up to date ($DIR/node_modules, node $NODE_VERSION)"
else
    say "npm ci in $DIR (node $NODE_VERSION)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$want" >node_modules/.hookrelay-stamp
    say "installed $(node -p '["express", "body-parser", "standardwebhooks"].map((n) =>
        `${n}@${require(`./node_modules/${n}/package.json`).version}`).join(" ")')"
fi
