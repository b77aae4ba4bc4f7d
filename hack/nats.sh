#!/usr/bin/env bash
# Builds nats-server (JetStream) from its published Go module for the tests of
# `--ingest-mode jetstream`, cached by version like the control plane.
#
#   hack/nats.sh build    build it if missing, print the bin directory
#   hack/nats.sh bindir   print the bin directory (no build)
set -euo pipefail

NATS_VERSION=${NATS_VERSION:-2.15.3}
CACHE_ROOT=${HOOKRELAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookrelay/tools}
BIN="$CACHE_ROOT/nats-v${NATS_VERSION}/bin"
SRC="$CACHE_ROOT/nats-v${NATS_VERSION}/src"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[nats] %s\n' "$*" >&2; }

build() {
  if [ ! -x "$BIN/nats-server" ]; then
    mkdir -p "$BIN" "$SRC"
    cd "$SRC"
    if [ ! -f go.mod ]; then
      go mod init hookrelay.dev/nats >/dev/null 2>&1
      go get -tool "github.com/nats-io/nats-server/v2@v$NATS_VERSION"
    fi
    log "building nats-server v$NATS_VERSION"
    go build -p 2 -trimpath -ldflags "-s -w" -o "$BIN/nats-server.tmp" github.com/nats-io/nats-server/v2
    mv "$BIN/nats-server.tmp" "$BIN/nats-server"
  fi
  echo "$BIN"
}

case "${1:-}" in
  build) build ;;
  bindir) echo "$BIN" ;;
  *) echo "usage: $0 build|bindir" >&2; exit 2 ;;
esac
