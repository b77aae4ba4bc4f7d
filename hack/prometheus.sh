#!/usr/bin/env bash
# Builds prometheus and promtool from Prometheus' published Go module, cached by version like
# the control plane, for the monitoring tests: `promtool check rules` and `promtool test rules`
# on the chart's PrometheusRule, and the e2e test that has a real Prometheus scrape the operator
# and evaluate every alert and dashboard query. The Go module's tags are v0.3MM.P for
# Prometheus 3.MM.P. Service discovery other than static and file is left out
# (`remove_all_sd`): the tests scrape a static loopback target.
#
#   hack/prometheus.sh build    build what is missing, print the bin directory
#   hack/prometheus.sh bindir   print the bin directory (no build)
set -euo pipefail

PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-3.16.0}
CACHE_ROOT=${HOOKRELAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookrelay/tools}
BIN="$CACHE_ROOT/prometheus-v${PROMETHEUS_VERSION}/bin"
SRC="$CACHE_ROOT/prometheus-v${PROMETHEUS_VERSION}/src"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[prometheus] %s\n' "$*" >&2; }

module_version() { # 3.16.0 -> v0.316.0
  local major=${PROMETHEUS_VERSION%%.*} rest=${PROMETHEUS_VERSION#*.}
  printf 'v0.%d%02d.%d' "$major" "${rest%%.*}" "${rest#*.}"
}

build() {
  local mod cmd ldf
  mod=$(module_version)
  mkdir -p "$BIN" "$SRC"
  cd "$SRC"
  if [ ! -f go.mod ]; then
    go mod init hookrelay.dev/prometheus >/dev/null 2>&1
    go get -tool "github.com/prometheus/prometheus/cmd/prometheus@$mod" \
      "github.com/prometheus/prometheus/cmd/promtool@$mod"
  fi
  ldf="-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
  ldf="$ldf -X github.com/prometheus/common/version.Revision=$mod"
  ldf="$ldf -X github.com/prometheus/common/version.Branch=$mod"
  ldf="$ldf -X github.com/prometheus/common/version.BuildDate=19700101-00:00:00"
  for cmd in prometheus promtool; do
    if [ ! -x "$BIN/$cmd" ]; then
      log "building $cmd v$PROMETHEUS_VERSION ($mod)"
      nice go build -p 2 -trimpath -tags remove_all_sd -ldflags "-s -w $ldf" \
        -o "$BIN/$cmd.tmp" "github.com/prometheus/prometheus/cmd/$cmd"
      mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    fi
  done
  echo "$BIN"
}

case "${1:-}" in
  build) build ;;
  bindir) echo "$BIN" ;;
  *) echo "usage: $0 build|bindir" >&2; exit 2 ;;
esac
