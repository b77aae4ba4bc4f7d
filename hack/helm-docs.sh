#!/usr/bin/env bash
# Builds helm-docs from its published Go module and generates the chart's README.md from
# charts/hookrelay/README.md.gotmpl and the `# --` comments of values.yaml. The binary is cached
# by version like the control plane's, so a machine builds it once.
#
#   hack/helm-docs.sh build    build it if missing, print the bin directory
#   hack/helm-docs.sh bindir   print the bin directory (no build)
#   hack/helm-docs.sh generate write charts/hookrelay/README.md
#   hack/helm-docs.sh check    generate into a temporary copy of the chart; fail with the diff
#                              when charts/hookrelay/README.md is not what it generates
set -euo pipefail

HELM_DOCS_VERSION=${HELM_DOCS_VERSION:-1.14.2}
CACHE_ROOT=${HOOKRELAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookrelay/tools}
BIN="$CACHE_ROOT/helm-docs-v${HELM_DOCS_VERSION}/bin"
SRC="$CACHE_ROOT/helm-docs-v${HELM_DOCS_VERSION}/src"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART=charts/hookrelay

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[helm-docs] %s\n' "$*" >&2; }

build() {
  if [ ! -x "$BIN/helm-docs" ]; then
    mkdir -p "$BIN" "$SRC"
    cd "$SRC"
    if [ ! -f go.mod ]; then
      go mod init hookrelay.dev/helm-docs >/dev/null 2>&1
      go get -tool "github.com/norwoodj/helm-docs/cmd/helm-docs@v$HELM_DOCS_VERSION"
    fi
    log "building helm-docs v$HELM_DOCS_VERSION"
    nice go build -p 2 -trimpath -ldflags "-s -w -X main.version=v$HELM_DOCS_VERSION" \
      -o "$BIN/helm-docs.tmp" github.com/norwoodj/helm-docs/cmd/helm-docs
    mv "$BIN/helm-docs.tmp" "$BIN/helm-docs"
  fi
  echo "$BIN"
}

# helm-docs CHART_DIR: README.md of that chart from its README.md.gotmpl, the same flags for
# `generate` and `check` so that both write the same file.
run() {
  "$BIN/helm-docs" --chart-search-root "$1" --template-files README.md.gotmpl \
    --output-file README.md --sort-values-order file --log-level warning
}

generate() {
  build >/dev/null
  run "$ROOT/$CHART"
}

# Values documented by no `# --` comment that the check lets pass, as a regular expression of
# keys (none: every value is described).
UNDESCRIBED_ALLOWED=

check() {
  build >/dev/null
  local tmp copy
  tmp=$(mktemp -d -t hookrelay-helm-docs.XXXXXX)
  # shellcheck disable=SC2064 # the directory of this run, expanded now
  trap "rm -rf '$tmp'" EXIT
  cp -R "$ROOT/$CHART" "$tmp/"
  copy="$tmp/$(basename "$CHART")"
  run "$copy"
  if ! diff -u "$ROOT/$CHART/README.md" "$copy/README.md"; then
    echo "$CHART/README.md is stale: run hack/helm-docs.sh generate and commit the result" >&2
    exit 1
  fi
  echo "$CHART/README.md is what helm-docs v$HELM_DOCS_VERSION generates"

  # Every value has a description: the keys of the values table that have none.
  printf '%s\n' '{{ range .Values }}{{ if not (or .Description .AutoDescription) }}{{ .Key }}{{ "\n" }}{{ end }}{{ end }}' \
    >"$copy/undescribed.gotmpl"
  "$BIN/helm-docs" --chart-search-root "$copy" --template-files undescribed.gotmpl \
    --output-file undescribed.txt --log-level warning
  local missing
  missing=$(grep -v '^$' "$copy/undescribed.txt" | grep -Ev "${UNDESCRIBED_ALLOWED:-^$}" || true)
  if [ -n "$missing" ]; then
    echo "values without a \`# --\` description in $CHART/values.yaml:" >&2
    echo "$missing" >&2
    exit 1
  fi
  echo "every value of $CHART/values.yaml has a description"
}

case "${1:-}" in
  build) build ;;
  bindir) echo "$BIN" ;;
  generate) generate ;;
  check) check ;;
  *) echo "usage: $0 build|bindir|generate|check" >&2; exit 2 ;;
esac
