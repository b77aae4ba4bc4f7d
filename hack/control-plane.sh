#!/usr/bin/env bash
# Builds the real control plane used by hookrelay's tests from published Go modules:
# kube-apiserver and kubectl (k8s.io/kubernetes), etcd (go.etcd.io/etcd/server/v3) and helm.
# The binaries are cached in a directory keyed by their versions, so a machine builds them once.
#
#   hack/control-plane.sh build                 build what is missing, print the bin directory
#   hack/control-plane.sh build-node            also what a real one-node cluster adds: kubelet,
#                                               kube-controller-manager, kube-scheduler,
#                                               kube-proxy, CoreDNS and the sandbox's pause
#   hack/control-plane.sh bindir                print the bin directory (no build)
#   hack/control-plane.sh start DIR [OWNER_PID] start etcd + kube-apiserver on free loopback ports,
#                                               write DIR/kubeconfig; with OWNER_PID, stop them
#                                               when that process exits
#   hack/control-plane.sh stop DIR              stop what `start DIR` started
#   hack/control-plane.sh stop-apiserver DIR    stop only the kube-apiserver (etcd keeps its data)
#   hack/control-plane.sh start-apiserver DIR   start it again, same port and flags
#   hack/control-plane.sh stop-etcd DIR         stop only etcd (its data dir is kept)
#   hack/control-plane.sh start-etcd DIR        start it again, same ports and data dir
#   hack/control-plane.sh pause-apiserver DIR   SIGSTOP the kube-apiserver (unreachable, not gone)
#   hack/control-plane.sh resume-apiserver DIR  SIGCONT it
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
HELM_VERSION=${HELM_VERSION:-3.22.0}
COREDNS_VERSION=${COREDNS_VERSION:-1.15.0}
CACHE_ROOT=${HOOKRELAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookrelay/tools}
KEY="k8s-v${K8S_VERSION}_etcd-v${ETCD_VERSION}_helm-v${HELM_VERSION}"
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
BIN="$CACHE_ROOT/$KEY/bin"
SRC="$CACHE_ROOT/$KEY/src"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
# shellcheck source=hack/lib/process.sh
. "$(dirname "$SELF")/lib/process.sh"
log() { printf '[control-plane] %s\n' "$*" >&2; }

# The control plane's commands, and those a real node adds, all from k8s.io/kubernetes.
CONTROL_PLANE_CMDS="kube-apiserver kubectl"
NODE_CMDS="kubelet kube-controller-manager kube-scheduler kube-proxy"

build_kubernetes() { # build_kubernetes CMD...: builds those of k8s.io/kubernetes/cmd missing
  local dir="$SRC/kubernetes" minor=${K8S_VERSION#*.}
  minor=${minor%%.*}
  mkdir -p "$dir"
  cd "$dir"
  if [ ! -f go.mod ]; then
    go mod init hookrelay.dev/control-plane >/dev/null 2>&1
    go mod edit -go=1.26.0
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    # k8s.io/kubernetes maps its staging modules with local replace lines that a consumer does
    # not inherit; map each one to its published version.
    sed -n 's|^\s*\(k8s.io/[^ ]*\) => ./staging/.*|\1|p' "$gomod" | while read -r m; do
      go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"
    done
  fi
  local cmd tools=()
  for cmd in "$@"; do
    grep -Eq "(^tool|[[:space:]])k8s.io/kubernetes/cmd/$cmd\$" go.mod || tools+=("k8s.io/kubernetes/cmd/$cmd@v$K8S_VERSION")
  done
  [ ${#tools[@]} -eq 0 ] || go get -tool "${tools[@]}"
  local ldf="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldf="$ldf -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in "$@"; do
    if [ ! -x "$BIN/$cmd" ]; then
      log "building $cmd v$K8S_VERSION"
      go build -p 2 -trimpath -ldflags "-s -w $ldf" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
      mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    fi
  done
}

build_etcd() {
  local dir="$SRC/etcd"
  mkdir -p "$dir"
  cd "$dir"
  if [ ! -f go.mod ]; then
    go mod init hookrelay.dev/etcd >/dev/null 2>&1
    go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  fi
  log "building etcd v$ETCD_VERSION"
  go build -p 2 -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

# CoreDNS, in a module of its own (it needs a newer client-go than the kube-apiserver's), with a
# main that registers only the plugins a cluster's DNS uses, which keeps the cloud SDKs out.
build_coredns() {
  local dir="$SRC/coredns"
  mkdir -p "$dir"
  cd "$dir"
  if [ ! -f go.mod ]; then
    go mod init hookrelay.dev/coredns >/dev/null 2>&1
    cat >main.go <<'GO'
// CoreDNS with the plugins of a cluster's Corefile only.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// In CoreDNS's own order (core/dnsserver/zdirectives.go).
	dnsserver.Directives = []string{
		"health", "ready", "errors", "log", "loadbalance", "cache", "kubernetes", "forward",
	}
}

func main() { coremain.Run() }
GO
    go get "github.com/coredns/coredns@v$COREDNS_VERSION"
    go mod tidy
  fi
  # Named by its version: the bin directory's key names the Kubernetes, etcd and helm ones.
  log "building coredns v$COREDNS_VERSION"
  go build -p 2 -trimpath -ldflags "-s -w" -o "$BIN/coredns.tmp" .
  mv "$BIN/coredns.tmp" "$BIN/coredns-v$COREDNS_VERSION"
}

# The sandbox ("pause") container's process: waits for SIGTERM, as a static binary.
build_pause() {
  local dir="$SRC/pause"
  mkdir -p "$dir"
  cd "$dir"
  [ -f go.mod ] || go mod init hookrelay.dev/pause >/dev/null 2>&1
  cat >main.go <<'GO'
// The process of a Pod's sandbox: it holds the Pod's namespaces until it is told to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
GO
  log "building pause"
  go build -trimpath -ldflags "-s -w" -o "$BIN/pause.tmp" .
  mv "$BIN/pause.tmp" "$BIN/pause"
}

build_helm() {
  log "building helm v$HELM_VERSION"
  # As helm's Makefile does: the Kubernetes version `helm template` and `helm lint` assume
  # (.Capabilities.KubeVersion, checked against a chart's kubeVersion) is the one of the
  # client-go helm is built with; without these flags it would be v1.20.
  local gomod minor
  gomod=$(go mod download -json "helm.sh/helm/v3@v$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  minor=$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod" | cut -d. -f2)
  [ -n "$minor" ] || { echo "no k8s.io/client-go in $gomod" >&2; exit 1; }
  local k8s="-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  k8s="$k8s -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  GOBIN="$SRC/helm-bin" go install -p 2 -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION $k8s" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  mv "$SRC/helm-bin/helm" "$BIN/helm"
}

free_port() {
  # Below the kernel's ephemeral range (32768 and up by default), so that no outgoing
  # connection holds the port between this check and the server binding it.
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

make_certs() {
  local d=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=hookrelay-test-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=admin/O=system:masters" \
    -keyout "$d/admin.key" -out "$d/admin.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$d/admin.ext"
  openssl x509 -req -in "$d/admin.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/admin.ext" -out "$d/admin.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

wait_up() { # wait_up PID SECONDS DESCRIPTION COMMAND...: 0 up, 1 timed out, 2 PID exited
  local pid=$1 deadline=$((SECONDS + $2)) what=$3
  shift 3
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { log "$what exited"; return 2; }
    if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what"; return 1; fi
    sleep 0.2
  done
}

# The servers' command lines, read from the ports saved in DIR, so that a restart (below) runs
# exactly what `start` ran. Each appends to its log (the caller truncates it on a fresh start).
run_etcd() { # run_etcd DIR: etcd on DIR/etcd.ports with data in DIR/etcd, in the background
  local d=$1 etcd_port peer_port
  read -r etcd_port peer_port <"$d/etcd.ports"
  "$BIN/etcd" --name default --data-dir "$d/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" >>"$d/etcd.log" 2>&1 </dev/null &
  echo $! >"$d/etcd.pid"
}

wait_etcd() {
  local d=$1 etcd_port peer_port
  read -r etcd_port peer_port <"$d/etcd.ports"
  wait_up "$(cat "$d/etcd.pid")" 60 etcd curl -sf "http://127.0.0.1:$etcd_port/health"
}

run_apiserver() { # run_apiserver DIR: kube-apiserver on DIR/kube-apiserver.port, in the background
  local d=$1 etcd_port peer_port api_port
  read -r etcd_port peer_port <"$d/etcd.ports"
  api_port=$(cat "$d/kube-apiserver.port")
  "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --advertise-address 127.0.0.1 \
    --tls-cert-file "$d/server.crt" --tls-private-key-file "$d/server.key" --client-ca-file "$d/ca.crt" \
    --authorization-mode RBAC --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$d/sa.pub" --service-account-signing-key-file "$d/sa.key" \
    --api-audiences https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 --disable-admission-plugins ServiceAccount \
    --allow-privileged=true >>"$d/kube-apiserver.log" 2>&1 </dev/null &
  echo $! >"$d/kube-apiserver.pid"
}

wait_apiserver() {
  local d=$1
  wait_up "$(cat "$d/kube-apiserver.pid")" 120 kube-apiserver \
    curl -sf --cacert "$d/ca.crt" --cert "$d/admin.crt" --key "$d/admin.key" \
    "https://127.0.0.1:$(cat "$d/kube-apiserver.port")/readyz"
}

start() {
  local d=$1 owner=${2:-}
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/etcd" ] || { log "not built: run $0 build"; exit 1; }
  mkdir -p "$d"
  d=$(cd "$d" && pwd)
  make_certs "$d"
  local etcd_port peer_port api_port attempt up
  # A port picked free can be taken before it is bound (a busy machine opens thousands of
  # connections a second): a server that exits at once is started again on other ports.
  for attempt in 1 2 3; do
    etcd_port=$(free_port); peer_port=$(free_port)
    rm -rf "$d/etcd"
    printf '%s %s\n' "$etcd_port" "$peer_port" >"$d/etcd.ports"
    : >"$d/etcd.log"; run_etcd "$d"
    up=0; wait_etcd "$d" || up=$?
    [ $up -eq 0 ] && break
    cp "$d/etcd.log" "$d/etcd.$attempt.log"
    [ $up -eq 2 ] && [ $attempt -lt 3 ] && continue
    tail -20 "$d/etcd.log" >&2; stop "$d"; exit 1
  done
  for attempt in 1 2 3; do
    api_port=$(free_port)
    echo "$api_port" >"$d/kube-apiserver.port"
    : >"$d/kube-apiserver.log"; run_apiserver "$d"
    up=0; wait_apiserver "$d" || up=$?
    [ $up -eq 0 ] && break
    cp "$d/kube-apiserver.log" "$d/kube-apiserver.$attempt.log"
    [ $up -eq 2 ] && [ $attempt -lt 3 ] && continue
    tail -20 "$d/kube-apiserver.log" >&2; stop "$d"; exit 1
  done
  write_kubeconfig "$d/kubeconfig" hookrelay-test "https://127.0.0.1:$api_port" "$d/ca.crt" \
    "$d/admin.crt" "$d/admin.key"
  if [ -n "$owner" ]; then
    # A watchdog, so that a test process that dies without cleaning up leaves nothing behind.
    setsid bash -c "while kill -0 $owner 2>/dev/null && [ -f '$d/kubeconfig' ]; do sleep 1; done; '$SELF' stop '$d'" \
      >/dev/null 2>&1 </dev/null &
  fi
  log "kube-apiserver ready at https://127.0.0.1:$api_port (kubeconfig: $d/kubeconfig)"
}

stop_one() { # stop_one DIR NAME: stop DIR/NAME.pid (a paused one too)
  local d=$1 f=$2 pid
  [ -f "$d/$f.pid" ] || return 0
  pid=$(cat "$d/$f.pid")
  kill "$pid" 2>/dev/null || true
  kill -CONT "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$d/$f.pid"
}

stop() {
  local d=$1
  stop_one "$d" kube-apiserver
  stop_one "$d" etcd
  rm -rf "$d/kubeconfig" "$d/etcd"
}

# For fault tests: one server stopped and started again on its ports, with etcd's data kept.
restart_part() { # restart_part stop|start|pause|resume kube-apiserver|etcd DIR
  local action=$1 f=$2 d=$3
  [ -f "$d/kubeconfig" ] || { log "no control plane in $d"; exit 1; }
  case "$action" in
    stop) stop_one "$d" "$f" ;;
    start)
      [ ! -f "$d/$f.pid" ] || { log "$f is running (pid $(cat "$d/$f.pid"))"; exit 1; }
      if [ "$f" = etcd ]; then run_etcd "$d"; wait_etcd "$d"; else run_apiserver "$d"; wait_apiserver "$d"; fi
      log "$f started again"
      ;;
    pause) kill -STOP "$(cat "$d/$f.pid")" ;;
    resume) kill -CONT "$(cat "$d/$f.pid")" ;;
  esac
}

case "${1:-build}" in
  start) start "${2:?usage: $0 start DIR [OWNER_PID]}" "${3:-}" ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  stop-apiserver | start-apiserver | pause-apiserver | resume-apiserver)
    restart_part "${1%-apiserver}" kube-apiserver "${2:?usage: $0 $1 DIR}" ;;
  stop-etcd | start-etcd) restart_part "${1%-etcd}" etcd "${2:?usage: $0 $1 DIR}" ;;
  bindir) echo "$BIN" ;;
  build | build-node)
    mkdir -p "$BIN"
    cmds=$CONTROL_PLANE_CMDS
    [ "$1" = build ] || cmds="$cmds $NODE_CMDS"
    for cmd in $cmds; do
      # shellcheck disable=SC2086 # a list of command names
      [ -x "$BIN/$cmd" ] || { build_kubernetes $cmds; break; }
    done
    [ -x "$BIN/etcd" ] || build_etcd
    [ -x "$BIN/helm" ] || build_helm
    if [ "$1" = build-node ]; then
      [ -x "$BIN/coredns-v$COREDNS_VERSION" ] || build_coredns
      [ -x "$BIN/pause" ] || build_pause
    fi
    echo "$BIN"
    ;;
  *) echo "usage: $0 [build|build-node|bindir|start|stop|{stop,start}-{apiserver,etcd}|{pause,resume}-apiserver]" >&2; exit 2 ;;
esac
