//! End-to-end tests against a real kube-apiserver and etcd (see `support`).

mod api;
mod api_hardening;
mod chart;
mod control_plane;
mod crash;
mod crds;
mod delivery;
mod flow;
mod hardening;
mod ingest;
mod jetstream;
mod leader;
mod operator;
mod support;
mod webhook_controller;
