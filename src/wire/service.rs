//! The Service a Webhook may name instead of a URL (`spec.serviceRef`), as resolved for sending.

use std::{net::IpAddr, sync::Arc};

/// A Service a Webhook names: its deliveries go to exactly its ClusterIP, the one private
/// address the egress policy lets through for it (named by the Webhook's author, in the
/// Webhook's own namespace), whatever `--egress-allow-cidr` says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// `<service>.<namespace>.svc`: the URL's host, and the name the Service's certificate is
    /// checked against. Never looked up in DNS: it resolves to `cluster_ip` only.
    pub host: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// PEM CA certificates trusted (alone) for https; None: plain http.
    pub ca_bundle: Option<Arc<str>>,
}
