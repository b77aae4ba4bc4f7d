//! End-to-end tests against a real kube-apiserver and etcd (see `support`).

mod abuse;
mod api;
mod api_hardening;
mod chart;
mod control_plane;
mod crash;
mod crds;
mod delivery;
mod faults_control_plane;
mod faults_receivers;
mod filter_suspension_rotation;
mod hardening;
mod ingest;
mod jetstream;
mod leader;
mod operator;
mod rate_limit_and_ordering;
mod recover;
mod secrets_never_leak;
mod service_ref_and_headers;
mod ssrf;
mod support;
mod telemetry;
mod web_api;
mod web_page;
mod webhook_controller;
