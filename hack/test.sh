#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, the end-to-end tests against a real
# kube-apiserver + etcd (the monitoring ones with a real Prometheus too), and the cluster tests
# on a real one-node cluster (kubelet, containerd, kube-proxy, CoreDNS; needs root) with
# hookrelay's image made from the release binary. The Go binaries are built once per machine
# by hack/control-plane.sh, hack/nats.sh and hack/prometheus.sh, cached by version.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "control plane and node binaries"
BIN=$(hack/control-plane.sh build-node)
export PATH="$BIN:$PATH"

step "nats-server (JetStream, for --ingest-mode jetstream)"
hack/nats.sh build

step "prometheus and promtool (the monitoring tests: the chart's alerts and dashboard)"
PROMETHEUS_BIN=$(hack/prometheus.sh build)
"$PROMETHEUS_BIN/prometheus" --version | head -1

step "test receivers (Python and Node, from the contract's verification code)"
hack/receivers.sh
tests/receivers/.venv/bin/python tests/receivers/selftest.py

step "browser test tools (chromium, Playwright for Python, axe-core)"
hack/browser.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "docs: every relative link resolves"
hack/check-docs.sh

step "cargo clippy (the product as released, then every target with the tests' seams)"
cargo clippy --locked --lib --bins -- -D warnings
cargo clippy --all-targets --locked --features test-seams -- -D warnings

step "release binary, built as the Dockerfile builds it (no test seams; the cluster tests' image)"
# The day, not the second: a rebuild per run would only change the date.
HOOKRELAY_BUILD_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown) \
  HOOKRELAY_BUILD_DATE=$(date -u +%Y-%m-%d) \
  cargo build --release --locked --bin hookrelay
"${CARGO_TARGET_DIR:-target}/release/hookrelay" version

step "helm lint (defaults, and every option on)"
helm lint --strict charts/hookrelay
helm lint --strict charts/hookrelay -f charts/hookrelay/ci/all-on-values.yaml

step "chart README: what helm-docs generates from README.md.gotmpl and values.yaml, every value described"
hack/helm-docs.sh check

step "build tests"
cargo test --locked --features test-seams --no-run

step "start kube-apiserver + etcd"
RUN_DIR=$(mktemp -d -t hookrelay-test.XXXXXX)
trap 'hack/control-plane.sh stop "$RUN_DIR"' EXIT
hack/control-plane.sh start "$RUN_DIR" $$
echo "kube-apiserver /version: $(kubectl --kubeconfig "$RUN_DIR/kubeconfig" get --raw /version | tr -d ' \n')"
echo "etcd: $("$BIN/etcd" --version | head -1)"
echo "kubectl: $(kubectl version --client | head -1)  helm: $(helm version --short)"

step "cargo test (the cluster tests start and stop their own one-node cluster)"
SYSCTLS_BEFORE=$(hack/cluster.sh sysctls)
HOOKRELAY_TEST_KUBECONFIG="$RUN_DIR/kubeconfig" cargo test --locked --features test-seams -- --nocapture

step "the one-node cluster left nothing behind"
hack/cluster.sh leftovers
if [ "$(hack/cluster.sh sysctls)" != "$SYSCTLS_BEFORE" ]; then
  echo "sysctls changed:"; diff <(echo "$SYSCTLS_BEFORE") <(hack/cluster.sh sysctls); exit 1
fi
echo "nothing: no lock, iptables rules, bridge, network namespace, mount, cgroup or process; sysctls as before"
