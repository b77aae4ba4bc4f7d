//! End-to-end tests on a real one-node Kubernetes cluster (`hack/cluster.sh`: kubelet,
//! containerd, kube-proxy, CoreDNS beside the kube-apiserver): the chart installed with `helm`,
//! hookrelay running as Pods of the image built here, receivers and clients as Pods, and every
//! request between them crossing the cluster's Services and DNS, with no test seam.
//!
//! The test process itself talks to the API server only (on 127.0.0.1): what a Pod receives or
//! answers, it reads from the Pod's log.
//!
//! Needs root (the node's containerd, network and cgroups). One cluster per machine: it is started
//! on first use and stopped when this process exits, or named by `HOOKRELAY_TEST_CLUSTER_DIR`
//! (a running `hack/cluster.sh start DIR`). Run: `cargo build --release --bin hookrelay && cargo
//! test --test cluster`.

// The e2e tests' harness: its kubectl and helm runners, namespaces and Webhook helpers. Not
// every part of it is used here.
#[path = "../e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

mod harness;

mod handover;
mod install;
mod quick_start;
mod service_ref;
mod upgrade;
