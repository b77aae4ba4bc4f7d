//! End-to-end tests against a real kube-apiserver and etcd (see `support`).

mod api;
mod api_hardening;
mod chart;
mod control;
mod control_plane;
mod crash;
mod crds;
mod delivery;
mod features_endpoint;
mod flow;
mod hardening;
mod ingest;
mod jetstream;
mod leader;
mod operator;
mod recover;
mod support;
mod telemetry;
mod webhook_controller;
