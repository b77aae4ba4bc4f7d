#!/usr/bin/env bash
# The main job, on this machine alone: a local kube-apiserver + etcd, the CRDs, the hookrelay
# operator, the examples, and a receiver built from the contract's verification code that shows the
# signed deliveries arriving. Set KEEP=1 to leave everything running until Ctrl-C.
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
RECEIVER_PID=
cleanup() {
  [ -z "$OPERATOR_PID" ] || kill "$OPERATOR_PID" 2>/dev/null || true
  [ -z "$RECEIVER_PID" ] || kill "$RECEIVER_PID" 2>/dev/null || true
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

step "start a local receiver built from the contract's Python verification code"
hack/receivers.sh >/dev/null
SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
tests/receivers/.venv/bin/python tests/receivers/receiver.py --port "${RECEIVER_PORT:-18080}" --secret "$SECRET" \
  >"$RUN_DIR/receiver.out" 2>"$RUN_DIR/receiver.log" &
RECEIVER_PID=$!
for _ in $(seq 50); do grep -q listening "$RUN_DIR/receiver.out" && break; sleep 0.1; done
RECEIVER=$(sed -n 's/^listening on //p' "$RUN_DIR/receiver.out")
echo "receiver listening on $RECEIVER (verifies X-Webhook-Signature and webhook-signature)"

step "start the operator (log: $RUN_DIR/operator.log)"
METRICS_ADDR=127.0.0.1:${METRICS_PORT:-19090}
# Local demo: plain http to loopback is allowed explicitly; only namespace demo is watched.
"$HOOKRELAY" run --metrics-addr "$METRICS_ADDR" --listen-addr "127.0.0.1:${API_PORT:-18081}" --watch-namespace demo --egress-allow-http --egress-allow-cidr 127.0.0.0/8 \
  >"$RUN_DIR/operator.log" 2>&1 &
OPERATOR_PID=$!
for _ in $(seq 150); do
  curl -sf "http://$METRICS_ADDR/readyz" >/dev/null && break
  kill -0 "$OPERATOR_PID" 2>/dev/null || { cat "$RUN_DIR/operator.log"; exit 1; }
  sleep 0.2
done
echo "operator ready: $(curl -s "http://$METRICS_ADDR/readyz")"

step "the example manifests validate (server-side dry run; they run for real on a cluster: examples/README.md)"
kubectl create namespace docs
kubectl apply --dry-run=server -n docs -f examples/webhook.yaml -f examples/webhook-all-events.yaml \
  -f examples/webhook-rate-limited-ordered.yaml -f examples/webhook-service-ref.yaml -f examples/ingest-job.yaml

step "a Webhook for the local receiver, and the contract's two events as DocumentEvents"
kubectl create namespace demo
kubectl create secret generic file-conversion-webhook -n demo --from-literal=secret="$SECRET"
kubectl label secret file-conversion-webhook -n demo hookrelay.dev/signing-secret=true
kubectl apply -n demo -f - <<YAML
apiVersion: hookrelay.dev/v1alpha1
kind: Webhook
metadata:
  name: file-conversion
spec:
  url: http://$RECEIVER/webhooks/file-conversion
  events: [document.completed, document.error]
  description: Notification endpoint for document processing events
  secretRef:
    name: file-conversion-webhook
YAML
kubectl wait -n demo --for=condition=Ready webhook/file-conversion --timeout=60s
kubectl create -n demo -f examples/document-event-completed.yaml -f examples/document-event-error.yaml
kubectl wait -n demo --for=jsonpath='{.status.phase}'=Delivered documentevents --all --timeout=60s

step "the same through the HTTP ingest, with a ServiceAccount token that may only create documentevents"
kubectl create serviceaccount ingest -n demo
kubectl create role ingest -n demo --verb=create --resource=documentevents.hookrelay.dev
kubectl create rolebinding ingest -n demo --role=ingest --serviceaccount=demo:ingest
TOKEN=$(kubectl create token ingest -n demo --audience hookrelay)
curl -sS -X POST "http://127.0.0.1:${API_PORT:-18081}/api/events" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' \
  -d '{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":125,"filename":"report.pdf","status":"completed"}}'
echo
echo "without a token:"
curl -sS -X POST "http://127.0.0.1:${API_PORT:-18081}/api/events" -d '{}'
echo
kubectl wait -n demo --for=jsonpath='{.status.phase}'=Delivered documentevents --all --timeout=60s

step "what the receiver got"
curl -s "http://$RECEIVER/results" | python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print(r['status'], r['event'], 'id=' + r['delivery_id'],
          'X-Webhook-Signature ok=%s webhook-signature ok=%s' % (r['hex_ok'], r['standard_ok']))
    print('   ', r['body'])"

step "kubectl get webhooks,documentevents -n demo"
sleep 1.5 # the status writer patches each object at most once a second
kubectl get webhooks,documentevents -n demo

step "the delivery log, as the web page reads it, with a read-only token"
kubectl create serviceaccount support -n demo
kubectl create role hookrelay-viewer -n demo --verb=get,list \
  --resource=webhooks.hookrelay.dev,documentevents.hookrelay.dev
kubectl create rolebinding support-hookrelay-viewer -n demo --role=hookrelay-viewer --serviceaccount=demo:support
VIEWER_TOKEN=$(kubectl create token support -n demo --audience hookrelay --duration 8h)
curl -sS "http://127.0.0.1:${API_PORT:-18081}/api/webhooks/file-conversion/deliveries?namespace=demo" \
  -H "Authorization: Bearer $VIEWER_TOKEN" | python3 -c "
import json, sys
for d in json.load(sys.stdin)['deliveries']:
    print(d['created_at'], d['event'], d['outcome'], d['status_code'], '%s ms' % d['response_time_ms'], d['id'])"
echo "the page: http://127.0.0.1:${API_PORT:-18081}/ui/ (KEEP=1 keeps it up); its read-only token:"
echo "$VIEWER_TOKEN"

if [ "${KEEP:-0}" = 1 ]; then
  step "running; export KUBECONFIG=$KUBECONFIG to look around; Ctrl-C stops everything"
  wait "$OPERATOR_PID"
fi
