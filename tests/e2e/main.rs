//! End-to-end tests against a real kube-apiserver and etcd (see `support`).
//!
//! Built with the cargo feature `test-seams` (`cargo test --features test-seams`, as
//! `hack/test.sh` runs them): the SSRF and `serviceRef` tests start the operator binary with its
//! hidden test flags, which other builds do not have.

#[cfg(not(feature = "test-seams"))]
compile_error!("the e2e tests need the operator's test seams: cargo test --features test-seams");

mod abuse;
mod api;
mod api_hardening;
mod api_v1;
mod chart;
mod control_plane;
mod crash;
mod crds;
mod delivery;
mod example_receivers;
mod faults_control_plane;
mod faults_receivers;
mod filter_suspension_rotation;
mod hardening;
mod ingest;
mod jetstream;
mod leader;
mod monitoring;
mod operator;
mod rate_limit_and_ordering;
mod recover;
mod replicas;
mod secrets_never_leak;
mod service_ref_and_headers;
mod ssrf;
mod support;
mod telemetry;
mod tenants;
mod web_api;
mod web_page;
mod webhook_controller;
