#!/usr/bin/env bash
# Installs what the webhook test receivers in tests/receivers/ need, idempotently:
#   tests/receivers/.venv          Python venv with standardwebhooks (requirements.txt, hash-pinned)
#   tests/receivers/node_modules   express, body-parser, standardwebhooks (npm ci from package-lock.json)
#   java and php                   for examples/receivers/ (Debian packages, when missing)
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

# shellcheck source=hack/lib/deps.sh
. "$DIR/../../hack/lib/deps.sh"

ensure_venv standardwebhooks --require-hashes
ensure_node_modules node_modules/express/package.json

# The example receivers (examples/receivers/) run on the language's own runtime: Python and
# Node.js (present), Go (present), and Java 17+ and PHP 8 from Debian when missing.
missing=()
command -v java >/dev/null || missing+=(default-jdk-headless)
command -v php >/dev/null || missing+=(php-cli)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "${missing[*]} missing, and installing them needs root"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
