#!/usr/bin/env bash
# The main job, on this machine alone: a local kube-apiserver + etcd, the CRDs, the hookrelay
# operator, and the examples. Set KEEP=1 to leave everything running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "control plane binaries (built once, cached by version)"
BIN=$(hack/control-plane.sh build)
export PATH="$BIN:$PATH"

step "build hookrelay"
cargo build --release --locked
HOOKRELAY=target/release/hookrelay

RUN_DIR=$(pwd)/.run/demo
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
OPERATOR_PID=
cleanup() {
  [ -z "$OPERATOR_PID" ] || kill "$OPERATOR_PID" 2>/dev/null || true
  hack/control-plane.sh stop "$RUN_DIR/cluster"
}
trap cleanup EXIT

step "start kube-apiserver + etcd"
hack/control-plane.sh start "$RUN_DIR/cluster" $$
export KUBECONFIG="$RUN_DIR/cluster/kubeconfig"
kubectl version

step "install the CRDs (generated from the Rust types: $HOOKRELAY crds)"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established crd/webhooks.hookrelay.dev crd/documentevents.hookrelay.dev

step "start the operator (log: $RUN_DIR/operator.log)"
METRICS_ADDR=127.0.0.1:${METRICS_PORT:-19090}
"$HOOKRELAY" run --metrics-addr "$METRICS_ADDR" >"$RUN_DIR/operator.log" 2>&1 &
OPERATOR_PID=$!
for _ in $(seq 150); do
  curl -sf "http://$METRICS_ADDR/readyz" >/dev/null && break
  kill -0 "$OPERATOR_PID" 2>/dev/null || { cat "$RUN_DIR/operator.log"; exit 1; }
  sleep 0.2
done
echo "operator ready: $(curl -s "http://$METRICS_ADDR/readyz")"

step "apply the examples into namespace docs"
kubectl create namespace docs
# These Webhooks point at public example URLs: the operator in this demo watches only the
# namespace "demo" for deliveries later on, so nothing is ever sent to them.
kubectl apply -n docs -f examples/secret.yaml -f examples/webhook.yaml -f examples/webhook-all-events.yaml
kubectl create -n docs -f examples/document-event-completed.yaml -f examples/document-event-error.yaml

step "kubectl get hookrelay -n docs"
kubectl get webhooks,documentevents -n docs

if [ "${KEEP:-0}" = 1 ]; then
  step "running; export KUBECONFIG=$KUBECONFIG to look around; Ctrl-C stops everything"
  wait "$OPERATOR_PID"
fi
