#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, for tests that need Pods, Services and DNS:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, a bridge CNI,
# kubelet, kube-proxy and CoreDNS (see docs REAL-NODE.md for why each setting is what it is).
# Needs root. The binaries come from `hack/control-plane.sh build-node`; containerd, runc, the
# CNI plugins, iptables and conntrack from Debian packages (installed when missing).
#
#   hack/cluster.sh start DIR [OWNER_PID]  start the cluster with its files in DIR, wait until the
#                                          node and CoreDNS are Ready, write DIR/kubeconfig
#                                          (admin); with OWNER_PID, stop it when that process exits
#   hack/cluster.sh stop DIR               tear down everything `start DIR` made or changed
#   hack/cluster.sh status DIR             which parts run, and the node
#
# The cluster shares the machine's network namespace (bridge, iptables, sysctls) and uses fixed
# ports (6443, the kubelet's and kube-proxy's): one per machine, held by a lock.
# Local images: hookrelay.local/pause:1 (the sandbox), hookrelay.local/coredns:<version> and
# hookrelay.local/probe:1, a static Go program: `probe serve [ADDR]` (HTTP, default :8080, answers
# with its host name), `probe receive ADDR SECRET [CERT KEY]` (a webhook receiver that checks
# X-Webhook-Signature and prints one line per delivery), `probe get URL`, `probe post URL
# TOKEN_FILE BODY` (prints the status and the reply), `probe api PATH` (GET from the API server
# with the Pod's ServiceAccount token), `probe lookup NAME`. Use imagePullPolicy: Never.
#
#   hack/cluster.sh load DIR IMAGE.tar...   import image tarballs (hack/image.sh) into the node
#   hack/cluster.sh sysctls                 the values of the sysctls a cluster changes
#   hack/cluster.sh leftovers               once a cluster stopped: anything it left (lock,
#                                           iptables, bridge, netns, mounts, cgroups,
#                                           processes); exits 1 if there is any
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
# shellcheck source=hack/lib/process.sh
. "$HERE/lib/process.sh"
COREDNS_VERSION=${COREDNS_VERSION:-1.15.0}
BIN=$("$HERE/control-plane.sh" bindir)
SRC="$(dirname "$BIN")/src"

LOCK=/run/hookrelay-cluster.lock
RUN=/run/hookrelay-cluster # containerd's state and socket, runc's root: short paths
NODE=hookrelay-node
API_PORT=6443
# The kube-apiserver's, the kubelet's (API, healthz), kube-proxy's (metrics, healthz), the
# controller-manager's and the scheduler's.
FIXED_PORTS="$API_PORT 10250 10248 10249 10256 10257 10259"
SERVICE_CIDR=10.96.0.0/24
KUBERNETES_IP=10.96.0.1 # the first IP of SERVICE_CIDR: the `kubernetes` Service
DNS_IP=10.96.0.10
POD_CIDR=10.244.0.0/24
CLUSTER_CIDR=10.244.0.0/16
UNREACHABLE="$SERVICE_CIDR $CLUSTER_CIDR" # routed nowhere off the node (see start)
BRIDGE=hookrelay0
CNI_NAME=hookrelay
PAUSE_IMAGE=hookrelay.local/pause:1
COREDNS_IMAGE=hookrelay.local/coredns:$COREDNS_VERSION
PROBE_IMAGE=hookrelay.local/probe:1
PACKAGES="containerd runc containernetworking-plugins iptables conntrack"
# What the kubelet and kube-proxy change, restored by stop.
SYSCTLS="net.ipv4.ip_forward net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
log() { printf '[cluster %6ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "$*"; exit 1; }

ctr_() { ctr --address "$RUN/containerd.sock" -n k8s.io "$@"; }
kc() { "$BIN/kubectl" --kubeconfig "$D/kubeconfig" "$@"; }

ensure_packages() {
  local p missing=() policy=/usr/sbin/policy-rc.d made=0
  # Installed, not merely known (a removed package keeps its configuration and a status).
  for p in $PACKAGES; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "installing ${missing[*]}"
  # No packaged service may start: this script runs containerd with its own config.
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made=1; fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  [ $made -eq 0 ] || rm -f "$policy"
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >&2 || true
  fi
}

# A static Go program for the tests' Pods (an HTTP server and a client), built once.
# Built again when this source changes (the binary is named by its hash).
build_probe() {
  local dir="$SRC/probe" hash
  mkdir -p "$dir"
  [ -f "$dir/go.mod" ] || (cd "$dir" && go mod init hookrelay.dev/probe >/dev/null 2>&1)
  cat >"$dir/main.go.new" <<'GO'
// probe serve [ADDR] | receive ADDR SECRET [CERT KEY] | get URL | post URL TOKEN_FILE BODY |
// api PATH | lookup NAME: a Pod's servers and clients in one binary.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	args := append(os.Args[1:], "serve")
	switch args[0] {
	case "serve":
		addr := ":8080"
		if len(args) > 2 {
			addr = args[1]
		}
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "hello from %s\n", host) })
		fmt.Fprintln(os.Stderr, http.ListenAndServe(addr, nil))
		os.Exit(1)
	case "receive":
		// A webhook receiver: verifies X-Webhook-Signature (lowercase hex HMAC-SHA256 of the raw
		// body keyed by SECRET) and prints one line per request, "delivery <X-Webhook-Delivery>
		// <body>" (answered 200) or "refused <reason>" (answered 401); https with CERT and KEY.
		if len(args) < 4 {
			usage()
		}
		secret := []byte(args[2])
		var out sync.Mutex
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(r.Body)
			mac := hmac.New(sha256.New, secret)
			mac.Write(body)
			want := hex.EncodeToString(mac.Sum(nil))
			got := r.Header.Get("X-Webhook-Signature")
			out.Lock()
			defer out.Unlock()
			switch {
			case err != nil:
				fmt.Printf("refused unreadable body: %v\n", err)
				w.WriteHeader(http.StatusBadRequest)
			case !hmac.Equal([]byte(want), []byte(got)):
				fmt.Printf("refused bad signature %q on %s\n", got, r.Header.Get("X-Webhook-Delivery"))
				w.WriteHeader(http.StatusUnauthorized)
			default:
				fmt.Printf("delivery %s %s\n", r.Header.Get("X-Webhook-Delivery"), bytes.TrimSpace(body))
			}
		})
		if len(args) > 5 {
			fmt.Fprintln(os.Stderr, http.ListenAndServeTLS(args[1], args[3], args[4], nil))
		} else {
			fmt.Fprintln(os.Stderr, http.ListenAndServe(args[1], nil))
		}
		os.Exit(1)
	case "post":
		// POST BODY (JSON) to URL with the bearer token read from TOKEN_FILE (a projected
		// ServiceAccount token), and print "status <code> <response body>" whatever the code.
		if len(args) < 5 {
			usage()
		}
		token, err := os.ReadFile(args[2])
		check(err)
		req, err := http.NewRequest("POST", args[1], strings.NewReader(args[3]))
		check(err)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		c := http.Client{Timeout: 10 * time.Second}
		resp, err := c.Do(req)
		check(err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		check(err)
		fmt.Printf("status %d %s\n", resp.StatusCode, bytes.TrimSpace(body))
	case "get":
		c := http.Client{Timeout: 10 * time.Second}
		show(c.Get(args[1]))
	case "api":
		// GET the API server's PATH through the `kubernetes` Service with the Pod's own token.
		sa := "/var/run/secrets/kubernetes.io/serviceaccount/"
		token, err := os.ReadFile(sa + "token")
		check(err)
		ca, err := os.ReadFile(sa + "ca.crt")
		check(err)
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		c := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		req, _ := http.NewRequest("GET", "https://kubernetes.default.svc"+args[1], nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		show(c.Do(req))
	case "lookup":
		addrs, err := net.LookupHost(args[1])
		check(err)
		for _, a := range addrs {
			fmt.Println(a)
		}
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: probe serve [ADDR] | receive ADDR SECRET [CERT KEY] | get URL | post URL TOKEN_FILE BODY | api PATH | lookup NAME")
	os.Exit(2)
}

// check exits 1 on err, saying it.
func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// show prints a response's body, and exits 1 on an error or a status of 400 and up.
func show(resp *http.Response, err error) {
	check(err)
	defer resp.Body.Close()
	_, _ = io.Copy(os.Stdout, resp.Body)
	if resp.StatusCode >= 400 {
		os.Exit(1)
	}
}
GO
  hash=$(sha256sum <"$dir/main.go.new" | cut -c1-12)
  PROBE_BIN=$BIN/hookrelay-probe-$hash
  [ ! -x "$PROBE_BIN" ] || return 0
  mv "$dir/main.go.new" "$dir/main.go"
  log "building the probe"
  (cd "$dir" && nice go build -trimpath -ldflags "-s -w" -o "$PROBE_BIN.tmp" .)
  mv "$PROBE_BIN.tmp" "$PROBE_BIN"
}

make_image() { # make_image TAR REF ENTRYPOINT_BINARY: the binary as /<its name>, the entrypoint
  "$HERE/image.sh" static "$2" "$3" "$1" >/dev/null 2>&1
}

host_ip() { # the address of the interface of the default route (no traffic is sent)
  local ip
  ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -1)
  [ -n "$ip" ] || ip=$(ip -4 -o addr show scope global | awk '{sub("/.*", "", $4); print $4; exit}')
  [ -n "$ip" ] || die "no IPv4 address found for the node"
  echo "$ip"
}

free_port() { # below the ephemeral range, as in control-plane.sh
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

cert() { # cert NAME SUBJECT EXTENSIONS: pki/NAME.{key,crt} signed by pki/ca
  local p=$D/pki
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" \
    -keyout "$p/$1.key" -out "$p/$1.csr" 2>/dev/null
  printf '%b\n' "$3" >"$p/$1.ext"
  openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
    -days 3650 -extfile "$p/$1.ext" -out "$p/$1.crt" 2>/dev/null
}

kubeconfig() { # kubeconfig NAME: DIR/NAME.kubeconfig with pki/NAME's certificate
  write_kubeconfig "$D/$1.kubeconfig" hookrelay-cluster "https://127.0.0.1:$API_PORT" \
    "$D/pki/ca.crt" "$D/pki/$1.crt" "$D/pki/$1.key"
}

make_pki() {
  local p=$D/pki host=$1 client='extendedKeyUsage=clientAuth'
  mkdir -p "$p"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=hookrelay-cluster-ca" -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:$host,IP:$KUBERNETES_IP,DNS:localhost,DNS:$NODE,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client/O=system:masters" "$client"
  cert admin "/CN=admin/O=system:masters" "$client"
  cert kubelet "/CN=system:node:$NODE/O=system:nodes" "$client"
  cert controller-manager "/CN=system:kube-controller-manager" "$client"
  cert scheduler "/CN=system:kube-scheduler" "$client"
  cert kube-proxy "/CN=system:kube-proxy" "$client"
  openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:prime256v1 -out "$p/sa.key" 2>/dev/null
  openssl pkey -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  local n
  for n in admin kubelet controller-manager scheduler kube-proxy; do kubeconfig "$n"; done
  mv "$D/admin.kubeconfig" "$D/admin.kubeconfig.tmp" # written as DIR/kubeconfig once all is up
}

wait_up() { # wait_up NAME SECONDS COMMAND...: 0 up; dies with the log's tail otherwise
  local name=$1 deadline=$((SECONDS + $2)) pid
  shift 2
  pid=$(cat "$D/$name.pid")
  until "$@" >/dev/null 2>&1; do
    alive "$pid" || { tail -20 "$D/logs/$name.log" >&2; die "$name exited"; }
    [ $SECONDS -lt $deadline ] || { tail -20 "$D/logs/$name.log" >&2; die "timed out waiting for $name"; }
    sleep 0.1
  done
  log "$name up"
}

wait_for() { # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, or die
  local deadline=$((SECONDS + $1)) what=$2 out
  shift 2
  until out=$("$@" 2>&1); do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what: $out"
    sleep 0.2
  done
}

run() { # run NAME COMMAND...: in the background, logging to DIR/logs/NAME.log
  local name=$1
  shift
  "$@" >>"$D/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$D/$name.pid"
}

write_configs() {
  local host=$1
  mkdir -p "$D/containerd/root" "$RUN/containerd/state" "$D/cni/net.d" "$D/cni/ipam" \
    "$D/kubelet" "$D/pod-logs"
  cat >"$D/containerd/config.toml" <<TOML
version = 2
root = "$D/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$RUN/containerd.sock"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
    max_conf_num = 1
TOML
  cat >"$D/cni/net.d/10-$CNI_NAME.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NAME",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$D/cni/ipam"}
  }]
}
JSON
  cat >"$D/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $host
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$RUN/containerd.sock
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: /etc/resolv.conf
podCIDR: $POD_CIDR
podLogsDir: $D/pod-logs
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization: {mode: Webhook}
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML
  cat >"$D/kube-proxy-config.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $NODE
clusterCIDR: $CLUSTER_CIDR
clientConnection: {kubeconfig: $D/kube-proxy.kubeconfig}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

coredns_manifest() {
  cat <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health
        ready
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }
        cache 30
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      priorityClassName: system-cluster-critical
      terminationGracePeriodSeconds: 1
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {add: [NET_BIND_SERVICE], drop: [ALL]}
        livenessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 10, failureThreshold: 5}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 1}
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
YAML
}

on_start_exit() { # start's EXIT trap: a failed start leaves nothing behind
  local rc=$?
  trap - EXIT
  [ $rc -ne 0 ] || return 0
  log "start failed: tearing down (logs in $D/logs)"
  (stop) || true
  exit $rc
}

start() {
  local owner=${1:-} host b etcd_port peer_port
  [ "$(id -u)" -eq 0 ] || die "needs root"
  for b in etcd kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy \
    "coredns-v$COREDNS_VERSION" pause; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: run hack/control-plane.sh build-node"
  done
  mkdir -p "$D"
  D=$(cd "$D" && pwd)
  local waited=0
  until mkdir "$LOCK" 2>/dev/null; do
    local other
    other=$(cat "$LOCK/dir" 2>/dev/null || echo '?')
    # A cluster whose kubeconfig is gone is being stopped (by its watchdog, say): wait for it.
    if [ -f "$other/kubeconfig" ] || [ $waited -ge 60 ]; then
      die "a cluster is running (or was not stopped) in $other: hack/cluster.sh stop that DIR first"
    fi
    [ $waited -gt 0 ] || log "waiting for the cluster in $other to stop"
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "$D" >"$LOCK/dir"
  trap on_start_exit EXIT
  trap 'exit 130' INT TERM # so that the EXIT trap tears down an interrupted start too
  local port
  for port in $FIXED_PORTS; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use"; fi
  done
  ensure_packages
  build_probe
  rm -rf "${D:?}/logs" "$D/pki" "$D/etcd"
  mkdir -p "$D/logs" "$RUN"
  host=$(host_ip)
  echo "$host" >"$D/host-ip"
  log "node $NODE at $host"
  : >"$D/sysctl.saved"
  local s
  for s in $SYSCTLS; do
    [ -e "/proc/sys/${s//.//}" ] && echo "$s $(sysctl -n "$s")" >>"$D/sysctl.saved"
  done
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  # Nothing addressed to the cluster's ranges may leave the machine. A packet to a ClusterIP that
  # kube-proxy has not programmed yet (a Service a second old) would otherwise follow the default
  # route out, and a kept-alive connection would stay there; unreachable, it fails at once and
  # is retried once the rules exist. The bridge's own /24 is more specific than CLUSTER_CIDR.
  for r in $UNREACHABLE; do ip route replace unreachable "$r"; done
  make_pki "$host"
  write_configs "$host"
  log "PKI and configs written"

  # containerd first: its images import while the control plane comes up.
  run containerd containerd --config "$D/containerd/config.toml"
  etcd_port=$(free_port); peer_port=$(free_port)
  echo "$etcd_port $peer_port" >"$D/etcd.ports"
  run etcd "$BIN/etcd" --name default --data-dir "$D/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port"
  wait_up containerd 30 ctr_ version
  local tars=$D/images
  mkdir -p "$tars"
  make_image "$tars/pause.tar" "$PAUSE_IMAGE" "$BIN/pause"
  # The binary is named by its version in the cache: in the image it is /coredns.
  mkdir -p "$tars/coredns" && cp "$BIN/coredns-v$COREDNS_VERSION" "$tars/coredns/coredns"
  make_image "$tars/coredns.tar" "$COREDNS_IMAGE" "$tars/coredns/coredns"
  mkdir -p "$tars/probe" && cp "$PROBE_BIN" "$tars/probe/probe"
  make_image "$tars/probe.tar" "$PROBE_IMAGE" "$tars/probe/probe"
  for b in pause coredns probe; do ctr_ images import "$tars/$b.tar" >/dev/null; done
  rm -rf "$tars"
  log "images imported"
  wait_up etcd 60 curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"

  local p=$D/pki
  run kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 0.0.0.0 --secure-port "$API_PORT" --advertise-address "$host" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
    --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$p/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP,Hostname
  wait_up kube-apiserver 120 curl -sf --max-time 2 --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz"
  run kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$D/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$D/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$D/controller-manager.kubeconfig" --bind-address 127.0.0.1 \
    --leader-elect=false --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --use-service-account-credentials --allocate-node-cidrs=false \
    --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR"
  run kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$D/scheduler.kubeconfig" \
    --authentication-kubeconfig "$D/scheduler.kubeconfig" \
    --authorization-kubeconfig "$D/scheduler.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false
  run kubelet "$BIN/kubelet" --config "$D/kubelet-config.yaml" --kubeconfig "$D/kubelet.kubeconfig" \
    --root-dir "$D/kubelet" --cert-dir "$D/kubelet/pki" --hostname-override "$NODE" --node-ip "$host"
  run kube-proxy "$BIN/kube-proxy" --config "$D/kube-proxy-config.yaml"
  wait_up kube-controller-manager 60 curl -sfk --max-time 2 https://127.0.0.1:10257/healthz
  wait_up kube-scheduler 60 curl -sfk --max-time 2 https://127.0.0.1:10259/healthz
  wait_up kubelet 60 curl -sf --max-time 2 http://127.0.0.1:10248/healthz
  wait_up kube-proxy 60 curl -sf --max-time 2 http://127.0.0.1:10256/healthz

  mv "$D/admin.kubeconfig.tmp" "$D/kubeconfig"
  wait_for 60 "node $NODE" kc get node "$NODE"
  # The ServiceAccount admission refuses Pods until their namespace's "default" one exists.
  wait_for 60 "kube-system's default ServiceAccount" kc -n kube-system get serviceaccount default
  coredns_manifest | kc apply -f - >/dev/null
  kc wait --for=condition=Ready "node/$NODE" --timeout=120s >/dev/null
  log "node Ready"
  kc -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null
  log "CoreDNS Ready"
  wait_for 60 "the default ServiceAccount" kc -n default get serviceaccount default
  trap - EXIT INT TERM

  if [ -n "$owner" ]; then
    # A watchdog, so that a test process that dies without cleaning up leaves nothing behind.
    setsid bash -c "while kill -0 $owner 2>/dev/null && [ -f '$D/kubeconfig' ]; do sleep 1; done; '$SELF' stop '$D'" \
      >/dev/null 2>&1 </dev/null &
  fi
  log "cluster up in $(elapsed)s: kubeconfig $D/kubeconfig"
}

stop_one() { # stop_one NAME: SIGTERM, then SIGKILL after 5 s
  local pid
  [ -f "$D/$1.pid" ] || return 0
  pid=$(cat "$D/$1.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$D/$1.pid"
}

kill_cgroup_tree() { # kill_cgroup_tree DIR: SIGKILL every process in a cgroup tree, then rmdir it
  local dir=$1 cg pid
  [ -d "$dir" ] || return 0
  for _ in 1 2 3; do
    while read -r cg; do
      while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$cg/cgroup.procs"
    done < <(find "$dir" -type d)
    sleep 0.1
    find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$dir" ] || return 0
  done
  log "could not remove cgroup $dir"
}

stop() {
  [ -d "$D" ] || die "no $D"
  D=$(cd "$D" && pwd)
  local holder
  holder=$(cat "$LOCK/dir" 2>/dev/null || true)
  # The teardown is machine-wide (iptables, the bridge, cgroups): not for another DIR's cluster.
  [ -z "$holder" ] || [ "$holder" = "$D" ] || die "the running cluster is $holder's, not $D's"
  rm -f "$D/kubeconfig" # the watchdog's cue
  # The kubelet first, so that nothing restarts the Pods; then the Pods' containers, through
  # containerd, which tears down their network namespaces with the CNI plugins.
  stop_one kubelet
  log "kubelet stopped"
  if [ -f "$D/containerd.pid" ] && [ -S "$RUN/containerd.sock" ]; then
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
  fi
  local n
  log "containers removed"
  for n in kube-proxy containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_one "$n"
    log "$n stopped"
  done
  # Shims whose containerd is gone, and any process left in the kubelet's cgroups.
  local pid
  for pid in $(pgrep -f -- "-address $RUN/containerd.sock" || true); do kill -9 "$pid" 2>/dev/null || true; done
  local c
  for c in /sys/fs/cgroup/*/kubepods; do kill_cgroup_tree "$c"; done
  # Network: the Pods' namespaces (containerd names them cni-*), the bridge, the iptables rules
  # of the kubelet, kube-proxy and the bridge plugin.
  for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do ip netns delete "$n" || true; done
  ip link delete "$BRIDGE" 2>/dev/null || true
  for n in $UNREACHABLE; do ip route del unreachable "$n" 2>/dev/null || true; done
  local ipt rules
  for ipt in iptables ip6tables; do
    command -v "$ipt-save" >/dev/null || continue
    # Every chain named KUBE-* or CNI-* and every rule that mentions one. (Not `save | grep -q`:
    # with pipefail, grep's early exit fails the save.)
    rules=$("$ipt-save")
    if grep -q -e KUBE- -e CNI- <<<"$rules"; then
      grep -v -e KUBE- -e CNI- <<<"$rules" | "$ipt-restore"
    fi
  done
  conntrack -D -s "$POD_CIDR" >/dev/null 2>&1 || true
  # Mounts under the cluster's directories (the kubelet's volumes, containerd's rootfs and shm).
  local m
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done < <(awk -v d="$D/" -v r="$RUN/" 'index($2, d) == 1 || index($2, r) == 1 {print $2}' /proc/self/mounts | sort -r)
  rm -rf "${RUN:?}" "$D/containerd" "$D/kubelet" "$D/etcd" "$D/cni/ipam" /var/lib/cni/results/"$CNI_NAME"-* 2>/dev/null || true
  rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
  if [ -f "$D/sysctl.saved" ]; then
    local k v
    while read -r k v; do sysctl -qw "$k=$v" 2>/dev/null || log "could not restore $k=$v"; done <"$D/sysctl.saved"
    rm -f "$D/sysctl.saved"
  fi
  if [ "$(cat "$LOCK/dir" 2>/dev/null)" = "$D" ]; then rm -rf "$LOCK"; fi
  log "stopped"
}

sysctls() { # the values of what the cluster changes, one "name value" per line
  local s
  for s in $SYSCTLS; do
    [ -e "/proc/sys/${s//.//}" ] && echo "$s $(sysctl -n "$s")"
  done
  return 0
}

leftovers() { # what a stopped cluster left behind; exits 1 if anything (waits for a stop first)
  local found=0 waited=0 rules
  while [ -d "$LOCK" ] && [ $waited -lt 60 ]; do sleep 0.5; waited=$((waited + 1)); done
  [ ! -d "$LOCK" ] || { echo "lock: $LOCK ($(cat "$LOCK/dir" 2>/dev/null))"; found=1; }
  rules=$(iptables-save 2>/dev/null || true)
  if grep -q -e KUBE- -e CNI- <<<"$rules"; then
    echo "iptables: $(grep -c -e KUBE- -e CNI- <<<"$rules") rules or chains named KUBE-* or CNI-*"
    found=1
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1; then echo "bridge: $BRIDGE"; found=1; fi
  local r
  for r in $UNREACHABLE; do
    if ip route show type unreachable | grep -q "^unreachable $r"; then echo "route: unreachable $r"; found=1; fi
  done
  if ip netns list 2>/dev/null | grep -q '^cni-'; then echo "network namespaces: $(ip netns list | grep -c '^cni-')"; found=1; fi
  # Clusters live in DIRs named hookrelay-cluster* (the tests') and in $RUN.
  local mounts
  mounts=$(awk '$2 ~ /hookrelay-cluster/ {print $2}' /proc/self/mounts)
  if [ -n "$mounts" ]; then echo "mounts: $(head -5 <<<"$mounts" | tr '\n' ' ')"; found=1; fi
  local c
  for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods*; do
    [ ! -d "$c" ] || { echo "cgroup: $c"; found=1; }
  done
  if pgrep -f -- hookrelay-cluster >/dev/null; then
    echo "processes: $(pgrep -a -f -- hookrelay-cluster | cut -c1-120 | tr '\n' ';')"
    found=1
  fi
  return $found
}

load() { # load IMAGE.tar...: into the running cluster's containerd, for imagePullPolicy: Never
  [ -f "$D/kubeconfig" ] || die "no cluster runs in $D"
  local tar
  for tar in "$@"; do ctr_ images import "$tar" >/dev/null; done
}

status() {
  local n pid
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
    pid=$(cat "$D/$n.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && alive "$pid"; then echo "$n: running ($pid)"; else echo "$n: not running"; fi
  done
  echo "lock: $(cat "$LOCK/dir" 2>/dev/null || echo none)"
  if [ -f "$D/kubeconfig" ]; then kc get nodes -o wide 2>&1 || true; fi
}

case "${1:-}" in
  start) D=${2:?usage: $0 start DIR [OWNER_PID]}; start "${3:-}" ;;
  stop) D=${2:?usage: $0 stop DIR}; stop ;;
  status) D=${2:?usage: $0 status DIR}; status ;;
  load) D=${2:?usage: $0 load DIR IMAGE.tar...}; shift 2; load "$@" ;;
  sysctls) sysctls ;;
  leftovers) leftovers ;;
  *) echo "usage: $0 start DIR [OWNER_PID] | stop DIR | status DIR | load DIR IMAGE.tar... | sysctls | leftovers" >&2; exit 2 ;;
esac
