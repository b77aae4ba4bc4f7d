//! The pure middle of the Webhook reconcile: from a Webhook and its Secret to a route and the
//! `Ready` condition. No API calls here, so every case is a unit test.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::ByteString;

pub use crate::crd::{PREVIOUS_KEY, SIGNING_SECRET_LABEL, ready_reason};
use crate::{
    crd::{ConditionState, Webhook},
    delivery::{EgressPolicy, Signer, redact_url},
    routing::{Route, RouteState, WebhookKey},
};

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
    use ready_reason::*;
    let ns = webhook.metadata.namespace.as_deref().unwrap_or_default();
    let spec = &webhook.spec;
    let secret_ref = &spec.secret_ref;

    let signer = match secret {
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
    let egress = egress.check_url(&spec.url);
    let shown_url = redact_url(&spec.url);

    let (state, ready) = match (&signer, egress, gone) {
        (Err((reason, message)), _, _) => blocked(reason, message.clone()),
        (_, Err(denied), _) => blocked(EGRESS_NOT_ALLOWED, format!("{shown_url}: {denied}")),
        (_, _, Some(message)) => blocked(ENDPOINT_GONE, message.to_owned()),
        _ if spec.paused => (
            RouteState::Paused,
            ConditionState::new(
                "Ready",
                false,
                PAUSED,
                "spec.paused is true: deliveries are held until it is false",
            ),
        ),
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
            key: WebhookKey::new(ns, webhook.metadata.name.as_deref().unwrap_or_default()),
            uid: webhook.metadata.uid.clone().unwrap_or_default(),
            generation: webhook.metadata.generation.unwrap_or_default(),
            url: spec.url.clone(),
            events: spec.events.clone(),
            signer: signer.ok(),
            delivery: spec.delivery.clone(),
            state,
            ordering: spec.ordering.clone(),
            superseded: Default::default(),
        },
        ready,
    }
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
