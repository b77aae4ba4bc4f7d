//! The pure middle of the Webhook reconcile: from a Webhook and its Secret to a route and the
//! `Ready` condition. No API calls here, so every case is a unit test.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Secret, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};

pub use crate::crd::{
    HEADERS_SECRET_LABEL, PREVIOUS_KEY, SERVICE_RECEIVER_LABEL, SIGNING_SECRET_LABEL,
    WEBHOOKS_ANNOTATION, ready_reason,
};
use crate::{
    crd::{ConditionState, ServiceRef, Webhook},
    delivery::{EgressDenied, EgressPolicy, redact_url},
    keys::WebhookKey,
    routing::{EventFilter, Route, RouteState},
    wire::{CustomHeaders, ServiceTarget, Signer, custom_headers},
};

/// What the controller keeps of a Service: what resolving a `serviceRef` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub type_: String,
    /// None for a headless Service (`clusterIP: None`).
    pub cluster_ip: Option<String>,
    /// TCP ports: name and number.
    pub ports: Vec<(Option<String>, i32)>,
}

impl ServiceInfo {
    pub fn from_service(service: &Service) -> Self {
        let spec = service.spec.clone().unwrap_or_default();
        Self {
            type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
            cluster_ip: spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None"),
            ports: spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .map(|p| (p.name, p.port))
                .collect(),
        }
    }
}

/// The Webhooks a Secret is bound to: those its `hookrelay.dev/webhooks` annotation names, and
/// the Webhook that owns it (the REST API's generated Secrets). A Secret bound to none may be
/// used by any Webhook of its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretBinding {
    names: BTreeSet<String>,
    /// uids of the Webhooks that own it.
    owners: BTreeSet<String>,
}

impl SecretBinding {
    pub fn of(secret: &Secret) -> Self {
        let names = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(WEBHOOKS_ANNOTATION))
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let owners = secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.kind == "Webhook" && o.api_version.starts_with("hookrelay.dev/"))
            .map(|o| o.uid.clone())
            .collect();
        Self { names, owners }
    }

    /// Whether it names any Webhook at all.
    pub fn is_bound(&self) -> bool {
        !self.names.is_empty() || !self.owners.is_empty()
    }

    /// Whether the Webhook `name` (uid `uid`) may use it.
    pub fn allows(&self, name: &str, uid: &str) -> bool {
        !self.is_bound() || self.names.contains(name) || self.owners.contains(uid)
    }

    /// Why `name` may not use Secret `secret` (of `kind`), and what would let it.
    fn refusal(&self, secret: &str, kind: &str, name: &str) -> String {
        let bound = match (self.names.is_empty(), self.owners.is_empty()) {
            (false, _) => {
                format!("is bound to other Webhooks by its annotation {WEBHOOKS_ANNOTATION}")
            }
            (true, _) => "was generated for another Webhook, which owns it".to_owned(),
        };
        format!(
            "{kind} Secret {secret} {bound}: add {name} to that annotation (comma-separated names) to let this Webhook use it, or use a Secret of its own"
        )
    }
}

/// A Secret as resolution needs it: its data and the Webhooks it is bound to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeptSecret {
    pub data: BTreeMap<String, ByteString>,
    pub binding: SecretBinding,
}

impl KeptSecret {
    pub fn of(secret: &Secret) -> Self {
        Self {
            data: secret.data.clone().unwrap_or_default(),
            binding: SecretBinding::of(secret),
        }
    }
}

/// What a Webhook references besides its signing Secret, as the controller knows it now (None:
/// not found, or not referenced).
#[derive(Clone, Copy, Debug, Default)]
pub struct References<'a> {
    /// The data of the `headersFrom` Secret.
    pub headers_secret: Option<&'a BTreeMap<String, ByteString>>,
    /// Which Webhooks the signing Secret may sign for (None: any of its namespace).
    pub signing_binding: Option<&'a SecretBinding>,
    /// Which Webhooks the `headersFrom` Secret may give headers to (None: any).
    pub headers_binding: Option<&'a SecretBinding>,
    /// The `serviceRef` Service.
    pub service: Option<&'a ServiceInfo>,
}

/// What a Webhook resolves to.
#[derive(Debug)]
pub struct Resolution {
    pub route: Route,
    pub ready: ConditionState,
}

/// Resolves `webhook` against the data of its Secret (None when the Secret does not exist) and
/// the egress policy. `gone` carries the message of an `EndpointGone` verdict that still applies
/// to this generation.
pub fn resolve(
    webhook: &Webhook,
    secret: Option<&BTreeMap<String, ByteString>>,
    egress: &EgressPolicy,
    gone: Option<&str>,
) -> Resolution {
    resolve_with(webhook, secret, References::default(), egress, gone)
}

/// [`resolve`], with what the Webhook references besides its signing Secret.
pub fn resolve_with(
    webhook: &Webhook,
    secret: Option<&BTreeMap<String, ByteString>>,
    refs: References<'_>,
    egress: &EgressPolicy,
    gone: Option<&str>,
) -> Resolution {
    use ready_reason::*;
    let ns = webhook.metadata.namespace.as_deref().unwrap_or_default();
    let name = webhook.metadata.name.as_deref().unwrap_or_default();
    let uid = webhook.metadata.uid.as_deref().unwrap_or_default();
    let spec = &webhook.spec;
    let secret_ref = &spec.secret_ref;
    // A Secret bound to other Webhooks is not this one's to use, whatever it holds.
    let not_bound = |binding: Option<&SecretBinding>, secret: &str, kind: &str| {
        binding.filter(|b| !b.allows(name, uid)).map(|b| {
            (
                SECRET_NOT_BOUND,
                b.refusal(&format!("{ns}/{secret}"), kind, name),
            )
        })
    };

    let signer = match secret {
        Some(_)
            if let Some(refused) = not_bound(refs.signing_binding, &secret_ref.name, "signing") =>
        {
            Err(refused)
        }
        None => Err((
            SECRET_NOT_FOUND,
            format!(
                "Secret {ns}/{} labelled {SIGNING_SECRET_LABEL}=true not found: only Secrets with that label sign deliveries",
                secret_ref.name
            ),
        )),
        Some(data) => match data.get(&secret_ref.key) {
            None => Err((
                SECRET_KEY_NOT_FOUND,
                format!(
                    "Secret {ns}/{} has no key {:?}",
                    secret_ref.name, secret_ref.key
                ),
            )),
            Some(current) => {
                Signer::new(&current.0, data.get(PREVIOUS_KEY).map(|p| p.0.as_slice()))
                    .map(Arc::new)
                    .map_err(|e| {
                        (
                            SECRET_INVALID,
                            format!(
                                "key {:?} of Secret {ns}/{}: {e}",
                                secret_ref.key, secret_ref.name
                            ),
                        )
                    })
            }
        },
    };
    // The endpoint: a URL checked by the egress policy, or a Service's ClusterIP.
    let (url, service, endpoint) = match (&spec.service_ref, &spec.url) {
        (Some(service_ref), _) => match service_target(ns, service_ref, refs.service, egress) {
            Ok((url, target)) => (url, Some(Arc::new(target)), Ok(())),
            Err(e) => (String::new(), None, Err(e)),
        },
        (None, Some(url)) => {
            let endpoint = egress
                .check_url(url)
                .map(drop)
                .map_err(|denied| (EGRESS_NOT_ALLOWED, format!("{}: {denied}", redact_url(url))));
            (url.clone(), None, endpoint)
        }
        (None, None) => (
            String::new(),
            None,
            Err((
                EGRESS_NOT_ALLOWED,
                "set spec.url or spec.serviceRef: there is nowhere to deliver to".into(),
            )),
        ),
    };
    let shown_url = redact_url(&url);
    let headers: Result<CustomHeaders, (&str, String)> = match &spec.headers_from {
        None => custom_headers(&spec.headers, None).map_err(|e| (HEADERS_INVALID, e)),
        Some(from) => match refs.headers_secret {
            Some(_)
                if let Some(refused) =
                    not_bound(refs.headers_binding, &from.secret_ref.name, "headersFrom") =>
            {
                Err(refused)
            }
            None => Err((
                SECRET_NOT_FOUND,
                format!(
                    "Secret {ns}/{} labelled {HEADERS_SECRET_LABEL}=true (spec.headersFrom) not found: only Secrets with that label give headers",
                    from.secret_ref.name
                ),
            )),
            Some(data) => {
                let secret = format!("{ns}/{}", from.secret_ref.name);
                custom_headers(&spec.headers, Some((&secret, data)))
                    .map_err(|e| (HEADERS_INVALID, e))
            }
        },
    };

    let suspension = failing_too_long(webhook);
    // Compiled once per reconcile of the spec, never per event.
    let filter = spec.filter.as_deref().map(EventFilter::compile).transpose();

    let (state, ready) = match (&signer, endpoint, &headers, gone) {
        (Err((reason, message)), _, _, _) => blocked(reason, message.clone()),
        (_, Err((reason, message)), _, _) => blocked(reason, message),
        (_, _, Err((reason, message)), _) => blocked(reason, message.clone()),
        (_, _, _, Some(message)) => blocked(ENDPOINT_GONE, message.to_owned()),
        _ if filter.is_err() => blocked(
            FILTER_INVALID,
            format!(
                "spec.filter: {}; no event is delivered until it is fixed",
                filter.as_ref().err().cloned().unwrap_or_default()
            ),
        ),
        _ if spec.paused => (
            RouteState::Paused,
            ConditionState::new(
                "Ready",
                false,
                PAUSED,
                "spec.paused is true: deliveries are held until it is false",
            ),
        ),
        _ if suspension.is_some() => blocked(FAILING_TOO_LONG, suspension.unwrap_or_default()),
        _ => (
            RouteState::Active,
            ConditionState::new(
                "Ready",
                true,
                ROUTED,
                format!("delivering {} to {shown_url}", describe_events(webhook)),
            ),
        ),
    };

    Resolution {
        route: Route {
            key: WebhookKey::new(ns, name),
            uid: uid.to_owned(),
            generation: webhook.metadata.generation.unwrap_or_default(),
            version: resource_version(&webhook.metadata),
            url,
            events: spec.events.clone(),
            signer: signer.ok(),
            delivery: spec.delivery.clone(),
            state,
            service,
            headers: headers.unwrap_or_default(),
            filter: filter.ok().flatten(),
            ordering: spec.ordering.clone(),
            superseded: Default::default(),
        },
        ready,
    }
}

/// An object's `resourceVersion` as a number (etcd's revision; 0 when absent or not a
/// number, which makes no work wait for it).
pub fn resource_version(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The URL and target of a `serviceRef`, from the Service as the controller knows it.
fn service_target(
    ns: &str,
    service_ref: &ServiceRef,
    service: Option<&ServiceInfo>,
    egress: &EgressPolicy,
) -> Result<(String, ServiceTarget), (&'static str, String)> {
    use ready_reason::*;
    let name = &service_ref.name;
    let Some(service) = service else {
        return Err((
            SERVICE_NOT_FOUND,
            format!(
                "Service {ns}/{name} labelled {SERVICE_RECEIVER_LABEL}=true not found: only Services with that label receive deliveries; label the Service (kubectl label service -n {ns} {name} {SERVICE_RECEIVER_LABEL}=true), create it, or correct spec.serviceRef.name"
            ),
        ));
    };
    if service.type_ == "ExternalName" {
        return Err((
            SERVICE_NOT_ALLOWED,
            format!(
                "Service {ns}/{name} is of type ExternalName, which names an address the egress policy would not check: use spec.url with that host name instead, or a Service with a ClusterIP"
            ),
        ));
    }
    let Some(cluster_ip) = &service.cluster_ip else {
        return Err((
            SERVICE_NOT_ALLOWED,
            format!(
                "Service {ns}/{name} is headless (clusterIP: None): hookrelay delivers to a Service's ClusterIP only; reference a Service with a ClusterIP"
            ),
        ));
    };
    let cluster_ip = cluster_ip.parse().map_err(|_| {
        (
            SERVICE_NOT_ALLOWED,
            format!("Service {ns}/{name} has no usable ClusterIP ({cluster_ip:?})"),
        )
    })?;
    let port = service
        .ports
        .iter()
        .find(|(port_name, number)| match &service_ref.port {
            IntOrString::Int(n) => number == n,
            IntOrString::String(s) => port_name.as_deref() == Some(s.as_str()),
        })
        .map(|(_, number)| *number);
    let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
        let wanted = match &service_ref.port {
            IntOrString::Int(n) => n.to_string(),
            IntOrString::String(s) => format!("named {s:?}"),
        };
        // Its ports are not listed: whoever writes a Webhook learns nothing of a Service but
        // that it opted in.
        return Err((
            SERVICE_PORT_NOT_FOUND,
            format!(
                "Service {ns}/{name} has no TCP port {wanted}: set spec.serviceRef.port to one of its ports (kubectl get service -n {ns} {name})"
            ),
        ));
    };
    let scheme = if service_ref.ca_bundle.is_some() {
        "https"
    } else if egress.allow_http {
        "http"
    } else {
        return Err((
            EGRESS_NOT_ALLOWED,
            format!(
                "Service {ns}/{name}: {}; set spec.serviceRef.caBundle to deliver over https",
                EgressDenied::PlainHttp
            ),
        ));
    };
    if let Some(pem) = &service_ref.ca_bundle
        && reqwest::Certificate::from_pem_bundle(pem.as_bytes()).is_err()
    {
        return Err((
            SERVICE_NOT_ALLOWED,
            "spec.serviceRef.caBundle holds no valid PEM certificate: give the CA certificates that sign the Service's certificate".into(),
        ));
    }
    let host = format!("{name}.{ns}.svc");
    let url = format!("{scheme}://{host}:{port}{}", service_ref.path);
    let target = ServiceTarget {
        host,
        cluster_ip,
        port,
        ca_bundle: service_ref.ca_bundle.as_deref().map(Arc::from),
    };
    Ok((url, target))
}

/// Whether deliveries are suspended, decided from the status alone (so every replica decides
/// the same, from the object its watch shows): the message of `FailingTooLong`, or None.
///
/// Suspended when `spec.delivery.suspendAfterFailingFor` is set and the latest attempt failed
/// at least that long after the failures started counting: at the first failed attempt after
/// the last success (`deliveryStats.failingSince`), or later at the last resume
/// (`status.resumedAt`) or when `Ready` last changed for another reason (a spec change that
/// lifts a suspension turns it True: the period starts again). A suspension decided for an
/// older generation is lifted by the spec change.
pub fn failing_too_long(webhook: &Webhook) -> Option<String> {
    let period = webhook.spec.delivery.suspend_after_failing_for.as_deref()?;
    let period_len = humantime::parse_duration(period).ok()?;
    let status = webhook.status.as_ref()?;
    let stats = &status.delivery_stats;
    if stats.consecutive_failures == 0 {
        return None;
    }
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let suspended_now = ready.filter(|c| c.reason == ready_reason::FAILING_TOO_LONG);
    if suspended_now.is_some_and(|c| c.observed_generation != webhook.metadata.generation) {
        return None;
    }
    let since = [
        Some(stats.failing_since.as_ref()?.0),
        status.resumed_at.as_ref().map(|t| t.0),
        ready
            .filter(|_| suspended_now.is_none())
            .map(|c| c.last_transition_time.0),
    ]
    .into_iter()
    .flatten()
    .max()?;
    let last_failure = stats.last_failure_time.as_ref()?.0;
    let failing_for = last_failure.duration_since(since);
    (failing_for >= k8s_openapi::jiff::SignedDuration::try_from(period_len).ok()?).then(|| {
        format!(
            "every delivery attempt since {} has failed, for longer than suspendAfterFailingFor ({period}): deliveries are held until POST /api/webhooks/{}/resume or a change of the spec",
            stats.failing_since.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
            webhook.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

fn blocked(reason: &'static str, message: String) -> (RouteState, ConditionState) {
    (
        RouteState::Blocked {
            reason,
            message: message.clone(),
        },
        ConditionState::new("Ready", false, reason, message),
    )
}

fn describe_events(webhook: &Webhook) -> String {
    webhook
        .spec
        .events
        .iter()
        .filter_map(|e| serde_json::to_value(e).ok())
        .filter_map(|v| {
            v.as_str().map(|s| {
                if s == "*" {
                    "every event".to_owned()
                } else {
                    s.to_owned()
                }
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
