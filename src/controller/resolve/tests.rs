use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use super::*;
use crate::crd::Webhook;

fn webhook(url: &str, paused: bool) -> Webhook {
    let mut w: Webhook = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"name": "w", "namespace": "docs", "uid": "u1", "generation": 3},
        "spec": {
            "url": url,
            "events": ["document.completed", "*"],
            "secretRef": {"name": "s"},
            "paused": paused
        }
    }))
    .unwrap();
    w.spec.secret_ref.key = "secret".into();
    w
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn local() -> EgressPolicy {
    EgressPolicy::new(true, vec!["127.0.0.0/8".parse().unwrap()])
}

#[test]
fn a_resolvable_webhook_is_routed_and_ready() {
    let r = resolve(
        &webhook("http://127.0.0.1:9/h", false),
        Some(&data(&[("secret", "abcdefghijklmnopqrstuvwx")])),
        &local(),
        None,
    );
    assert!(r.ready.status);
    assert_eq!(r.ready.reason, ready_reason::ROUTED);
    assert_eq!(
        r.ready.message,
        "delivering document.completed, every event to http://127.0.0.1:9/h"
    );
    assert_eq!(r.route.state, RouteState::Active);
    assert_eq!(r.route.key, WebhookKey::new("docs", "w"));
    assert_eq!((r.route.uid.as_str(), r.route.generation), ("u1", 3));
    let expected = Signer::new(b"abcdefghijklmnopqrstuvwx", None).unwrap();
    assert_eq!(r.route.signer.as_deref(), Some(&expected));
}

#[test]
fn missing_secret_key_or_bad_value_block_the_route() {
    let w = webhook("https://example.com/h", false);
    let strict = EgressPolicy::default();
    let cases = [
        (
            None,
            ready_reason::SECRET_NOT_FOUND,
            "Secret docs/s labelled hookrelay.dev/signing-secret=true not found",
        ),
        (
            Some(data(&[("other", "x")])),
            ready_reason::SECRET_KEY_NOT_FOUND,
            "Secret docs/s has no key \"secret\"",
        ),
        (
            Some(data(&[("secret", "")])),
            ready_reason::SECRET_INVALID,
            "the secret is empty",
        ),
        (
            Some(data(&[("secret", "your_secret")])),
            ready_reason::SECRET_INVALID,
            "use at least 16 random bytes",
        ),
        (
            Some(data(&[("secret", "whsec_")])),
            ready_reason::SECRET_INVALID,
            "the key is empty",
        ),
    ];
    for (secret, reason, message) in cases {
        let r = resolve(&w, secret.as_ref(), &strict, None);
        assert!(!r.ready.status, "{reason}");
        assert_eq!(r.ready.reason, reason);
        assert!(r.ready.message.contains(message), "{}", r.ready.message);
        assert!(matches!(r.route.state, RouteState::Blocked { reason: b, .. } if b == reason));
        assert!(r.route.signer.is_none());
    }
}

#[test]
fn egress_policy_blocks_plain_http_and_private_addresses() {
    let secret = data(&[("secret", "abcdefghijklmnopqrstuvwx")]);
    let strict = EgressPolicy::default();
    let r = resolve(
        &webhook("http://example.com/h", false),
        Some(&secret),
        &strict,
        None,
    );
    assert_eq!(r.ready.reason, ready_reason::EGRESS_NOT_ALLOWED);
    assert!(
        r.ready.message.contains("--egress-allow-http"),
        "{}",
        r.ready.message
    );
    let r = resolve(
        &webhook("https://169.254.169.254/latest", false),
        Some(&secret),
        &strict,
        None,
    );
    assert_eq!(r.ready.reason, ready_reason::EGRESS_NOT_ALLOWED);
    assert!(
        r.ready.message.contains("link-local"),
        "{}",
        r.ready.message
    );
    // The signer still resolves, so fixing the URL is the only step left.
    assert!(r.route.signer.is_some());
}

#[test]
fn secret_problems_come_before_egress_and_paused() {
    let r = resolve(
        &webhook("http://example.com/h", true),
        None,
        &EgressPolicy::default(),
        None,
    );
    assert_eq!(r.ready.reason, ready_reason::SECRET_NOT_FOUND);
}

#[test]
fn paused_webhooks_are_routed_but_held() {
    let r = resolve(
        &webhook("http://127.0.0.1:9/h", true),
        Some(&data(&[("secret", "abcdefghijklmnopqrstuvwx")])),
        &local(),
        None,
    );
    assert_eq!(r.route.state, RouteState::Paused);
    assert_eq!(
        (r.ready.status, r.ready.reason.as_str()),
        (false, ready_reason::PAUSED)
    );
}

#[test]
fn endpoint_gone_holds_until_the_spec_changes() {
    let r = resolve(
        &webhook("http://127.0.0.1:9/h", false),
        Some(&data(&[("secret", "abcdefghijklmnopqrstuvwx")])),
        &local(),
        Some("the endpoint answered 410 Gone"),
    );
    assert_eq!(r.ready.reason, ready_reason::ENDPOINT_GONE);
    assert!(matches!(r.route.state, RouteState::Blocked { .. }));
}

#[test]
fn previous_key_signs_during_a_rotation() {
    let secret = data(&[
        ("secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("previous", "whsec_c2VjcmV0LXByZXZpb3Vz"),
    ]);
    let r = resolve(
        &webhook("http://127.0.0.1:9/h", false),
        Some(&secret),
        &local(),
        None,
    );
    let sig = r.route.signer.unwrap().sign("id", 1, b"{}");
    assert_eq!(sig.standard.unwrap().split(' ').count(), 2);
}

fn service_webhook(service_ref: serde_json::Value) -> Webhook {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"name": "w", "namespace": "docs", "uid": "u1", "generation": 3},
        "spec": {
            "serviceRef": service_ref,
            "events": ["*"],
            "secretRef": {"name": "s", "key": "secret"},
        }
    }))
    .unwrap()
}

fn service(type_: &str, cluster_ip: Option<&str>, ports: &[(Option<&str>, i32)]) -> ServiceInfo {
    ServiceInfo {
        type_: type_.into(),
        cluster_ip: cluster_ip.map(Into::into),
        ports: ports.iter().map(|(n, p)| (n.map(Into::into), *p)).collect(),
    }
}

fn resolve_service(w: &Webhook, svc: Option<&ServiceInfo>, egress: &EgressPolicy) -> Resolution {
    let refs = References {
        service: svc,
        ..References::default()
    };
    resolve_with(
        w,
        Some(&data(&[("secret", "abcdefghijklmnopqrstuvwx")])),
        refs,
        egress,
        None,
    )
}

#[test]
fn a_service_ref_resolves_to_its_cluster_ip_and_port_by_name_or_number() {
    let svc = service(
        "ClusterIP",
        Some("10.0.0.12"),
        &[(Some("http"), 8080), (None, 9090)],
    );
    let strict_http = EgressPolicy::new(true, Vec::new());
    for port in [serde_json::json!("http"), serde_json::json!(8080)] {
        let w = service_webhook(
            serde_json::json!({"name": "recv", "port": port, "path": "/hooks?x=1"}),
        );
        let r = resolve_service(&w, Some(&svc), &strict_http);
        assert_eq!(r.ready.reason, ready_reason::ROUTED, "{}", r.ready.message);
        assert_eq!(r.route.url, "http://recv.docs.svc:8080/hooks?x=1");
        let target = r.route.service.as_deref().unwrap();
        assert_eq!(target.host, "recv.docs.svc");
        assert_eq!(
            target.cluster_ip,
            "10.0.0.12".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(target.port, 8080);
        assert_eq!(target.ca_bundle, None);
    }
}

#[test]
fn a_service_ref_is_blocked_until_the_service_and_port_exist_and_allowed() {
    use ready_reason::*;
    let w = service_webhook(serde_json::json!({"name": "recv", "port": "http"}));
    let allow_http = EgressPolicy::new(true, Vec::new());
    let reason = |svc: Option<&ServiceInfo>, egress: &EgressPolicy| {
        let r = resolve_service(&w, svc, egress);
        assert!(r.route.service.is_none());
        assert!(matches!(r.route.state, RouteState::Blocked { .. }));
        (r.ready.reason, r.ready.message)
    };
    let (r, m) = reason(None, &allow_http);
    assert_eq!(r, SERVICE_NOT_FOUND);
    assert!(
        m.contains("Service docs/recv labelled hookrelay.dev/webhook-receiver=true not found"),
        "{m}"
    );
    let (r, m) = reason(
        Some(&service(
            "ClusterIP",
            Some("10.0.0.12"),
            &[(Some("grpc"), 81)],
        )),
        &allow_http,
    );
    assert_eq!(r, SERVICE_PORT_NOT_FOUND);
    assert!(
        !m.contains("81"),
        "the Service's ports are not revealed: {m}"
    );
    let (r, m) = reason(
        Some(&service("ExternalName", None, &[(Some("http"), 80)])),
        &allow_http,
    );
    assert_eq!(r, SERVICE_NOT_ALLOWED);
    assert!(m.contains("ExternalName"), "{m}");
    let (r, m) = reason(
        Some(&service("ClusterIP", None, &[(Some("http"), 80)])),
        &allow_http,
    );
    assert_eq!(r, SERVICE_NOT_ALLOWED);
    assert!(m.contains("headless"), "{m}");
    // Plain http needs --egress-allow-http, as for a url.
    let (r, m) = reason(
        Some(&service(
            "ClusterIP",
            Some("10.0.0.12"),
            &[(Some("http"), 80)],
        )),
        &EgressPolicy::default(),
    );
    assert_eq!(r, EGRESS_NOT_ALLOWED);
    assert!(m.contains("caBundle"), "{m}");
}

#[test]
fn a_ca_bundle_makes_it_https_and_a_bad_one_is_refused() {
    let svc = service("ClusterIP", Some("10.0.0.12"), &[(Some("https"), 443)]);
    let bad = service_webhook(serde_json::json!({"name": "recv", "port": 443,
        "caBundle": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"}));
    let r = resolve_service(&bad, Some(&svc), &EgressPolicy::default());
    assert_eq!(r.ready.reason, ready_reason::SERVICE_NOT_ALLOWED);
    assert!(r.ready.message.contains("caBundle"), "{}", r.ready.message);
}

#[test]
fn headers_from_a_missing_or_bad_secret_block_the_route_without_showing_values() {
    let mut w = webhook("https://example.com/h", false);
    w.spec.headers = [("X-Env".to_string(), "prod".to_string())].into();
    w.spec.headers_from = Some(crate::crd::HeadersFrom {
        secret_ref: crate::crd::LocalSecretRef {
            name: "hdrs".into(),
        },
    });
    let signing = data(&[("secret", "abcdefghijklmnopqrstuvwx")]);
    let strict = EgressPolicy::default();
    let r = resolve_with(&w, Some(&signing), References::default(), &strict, None);
    assert_eq!(r.ready.reason, ready_reason::SECRET_NOT_FOUND);
    assert!(
        r.ready
            .message
            .contains("hookrelay.dev/webhook-headers=true"),
        "{}",
        r.ready.message
    );

    let forged = data(&[("X-Webhook-Signature", "forged-value")]);
    let refs = References {
        headers_secret: Some(&forged),
        ..References::default()
    };
    let r = resolve_with(&w, Some(&signing), refs, &strict, None);
    assert_eq!(r.ready.reason, ready_reason::HEADERS_INVALID);
    assert!(
        r.ready.message.contains("X-Webhook-Signature"),
        "{}",
        r.ready.message
    );
    assert!(
        !r.ready.message.contains("forged-value"),
        "{}",
        r.ready.message
    );

    let good = data(&[("Authorization", "Bearer t")]);
    let refs = References {
        headers_secret: Some(&good),
        ..References::default()
    };
    let r = resolve_with(&w, Some(&signing), refs, &strict, None);
    assert_eq!(r.ready.reason, ready_reason::ROUTED);
    let names: Vec<&str> = r.route.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x-env", "authorization"]);
}

#[test]
fn a_filter_is_compiled_into_the_route_and_a_bad_one_is_filter_invalid() {
    let secret = data(&[("secret", "abcdefghijklmnopqrstuvwx")]);
    let mut w = webhook("http://127.0.0.1:9/h", false);
    w.spec.filter = Some(r#"data.status == "completed""#.into());
    let r = resolve(&w, Some(&secret), &local(), None);
    assert_eq!(r.route.state, RouteState::Active);
    assert_eq!(
        r.route.filter.as_deref().map(|f| f.source()),
        Some(r#"data.status == "completed""#)
    );

    w.spec.filter = Some("data.status ==".into());
    let r = resolve(&w, Some(&secret), &local(), None);
    assert_eq!(
        (r.ready.status, r.ready.reason.as_str()),
        (false, ready_reason::FILTER_INVALID)
    );
    assert!(
        r.ready
            .message
            .starts_with("spec.filter: ERROR: <input>:1:"),
        "{}",
        r.ready.message
    );
    assert!(
        matches!(r.route.state, RouteState::Blocked { reason, .. } if reason == ready_reason::FILTER_INVALID)
    );
}

/// A Webhook suspending after 3s of failures, with `status` (JSON) as its status.
fn failing(status: serde_json::Value, generation: i64) -> Webhook {
    let mut w = webhook("http://127.0.0.1:9/h", false);
    w.spec.delivery.suspend_after_failing_for = Some("3s".into());
    w.metadata.generation = Some(generation);
    w.status = Some(serde_json::from_value(status).unwrap());
    w
}

fn stats(failing_since: &str, last_failure: &str) -> serde_json::Value {
    serde_json::json!({"succeeded": 1, "failed": 0, "consecutiveFailures": 4,
        "lastSuccessTime": "2026-01-01T00:00:00Z", "lastFailureTime": last_failure,
        "failingSince": failing_since})
}

fn ready(status: &str, reason: &str, at: &str, generation: i64) -> serde_json::Value {
    serde_json::json!({"type": "Ready", "status": status, "reason": reason, "message": "",
        "lastTransitionTime": at, "observedGeneration": generation})
}

#[test]
fn failing_for_the_whole_period_suspends_and_a_resume_or_spec_change_lifts_it() {
    let secret = data(&[("secret", "abcdefghijklmnopqrstuvwx")]);
    let reason = |w: &Webhook| resolve(w, Some(&secret), &local(), None).ready.reason;
    let routed = ready("True", "Routed", "2026-01-01T00:00:00Z", 1);

    // Failing for 2s: not yet.
    let w = failing(
        serde_json::json!({"deliveryStats": stats("2026-01-01T00:01:00Z", "2026-01-01T00:01:02Z"), "conditions": [routed]}),
        1,
    );
    assert_eq!(reason(&w), ready_reason::ROUTED);

    // Failing for 3s: suspended, and the route holds deliveries.
    let suspended_status = serde_json::json!({"deliveryStats": stats("2026-01-01T00:01:00Z", "2026-01-01T00:01:03Z"), "conditions": [routed]});
    let w = failing(suspended_status.clone(), 1);
    let r = resolve(&w, Some(&secret), &local(), None);
    assert_eq!(r.ready.reason, ready_reason::FAILING_TOO_LONG);
    assert!(
        r.ready.message.contains("since 2026-01-01T00:01:00Z")
            && r.ready.message.contains("/resume"),
        "{}",
        r.ready.message
    );
    assert!(
        matches!(r.route.state, RouteState::Blocked { reason, .. } if reason == ready_reason::FAILING_TOO_LONG)
    );
    // Without the field nothing is ever suspended.
    let mut unset = w.clone();
    unset.spec.delivery.suspend_after_failing_for = None;
    assert_eq!(reason(&unset), ready_reason::ROUTED);

    // Once suspended it stays so, whatever attempts were still recorded.
    let now_suspended = |resumed: Option<&str>, generation| {
        let mut status = serde_json::json!({
            "deliveryStats": stats("2026-01-01T00:01:00Z", "2026-01-01T00:01:04Z"),
            "conditions": [ready("False", ready_reason::FAILING_TOO_LONG, "2026-01-01T00:01:03Z", 1)]
        });
        if let Some(at) = resumed {
            status["resumedAt"] = at.into();
        }
        failing(status, generation)
    };
    assert_eq!(
        reason(&now_suspended(None, 1)),
        ready_reason::FAILING_TOO_LONG
    );
    // A resume restarts the period; so does a new generation.
    assert_eq!(
        reason(&now_suspended(Some("2026-01-01T00:01:05Z"), 1)),
        ready_reason::ROUTED
    );
    assert_eq!(reason(&now_suspended(None, 2)), ready_reason::ROUTED);

    // After the lift (Ready True again at 00:01:06), only failures for 3s from then count.
    let lifted = |last_failure| {
        failing(
            serde_json::json!({
                "deliveryStats": stats("2026-01-01T00:01:00Z", last_failure),
                "conditions": [ready("True", "Routed", "2026-01-01T00:01:06Z", 2)]
            }),
            2,
        )
    };
    assert_eq!(
        reason(&lifted("2026-01-01T00:01:08Z")),
        ready_reason::ROUTED
    );
    assert_eq!(
        reason(&lifted("2026-01-01T00:01:09Z")),
        ready_reason::FAILING_TOO_LONG
    );
}

fn secret_bound(annotation: Option<&str>, owner_uid: Option<&str>) -> SecretBinding {
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "s",
            "annotations": annotation.map(|a| serde_json::json!({"hookrelay.dev/webhooks": a})),
            "ownerReferences": owner_uid.map(|uid| serde_json::json!([{
                "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "name": "owner", "uid": uid
            }])),
        }
    }))
    .unwrap();
    SecretBinding::of(&secret)
}

#[test]
fn a_secret_bound_to_other_webhooks_neither_signs_nor_gives_headers_for_this_one() {
    let signing = data(&[("secret", "abcdefghijklmnopqrstuvwx")]);
    let headers = data(&[("Authorization", "Bearer t")]);
    let mut w = webhook("http://127.0.0.1:9/h", false);
    w.spec.headers_from =
        Some(serde_json::from_value(serde_json::json!({"secretRef": {"name": "h"}})).unwrap());
    let name = w.metadata.name.clone().unwrap();
    let uid = w.metadata.uid.clone().unwrap_or_default();
    let reason = |signing_binding: &SecretBinding, headers_binding: &SecretBinding| {
        let refs = References {
            headers_secret: Some(&headers),
            signing_binding: Some(signing_binding),
            headers_binding: Some(headers_binding),
            ..References::default()
        };
        let r = resolve_with(&w, Some(&signing), refs, &local(), None);
        (r.ready.reason, r.ready.message, r.route.signer.is_some())
    };
    let unbound = SecretBinding::default();
    // Bound to none: any Webhook of the namespace, as before bindings existed.
    assert_eq!(reason(&unbound, &unbound).0, ready_reason::ROUTED);
    // Named, alone or among others (spaces allowed).
    let named = secret_bound(Some(&format!("other, {name}")), None);
    assert_eq!(reason(&named, &named).0, ready_reason::ROUTED);
    // Bound to other Webhooks: refused, with no signer at all.
    let others = secret_bound(Some("team-a,team-c"), None);
    let (why, message, signs) = reason(&others, &unbound);
    assert_eq!(
        (why.as_str(), signs),
        (ready_reason::SECRET_NOT_BOUND, false)
    );
    assert!(
        message.contains("signing Secret") && message.contains("hookrelay.dev/webhooks"),
        "{message}"
    );
    let (why, message, _) = reason(&unbound, &others);
    assert_eq!(why, ready_reason::SECRET_NOT_BOUND);
    assert!(message.contains("headersFrom Secret"), "{message}");
    // Generated for (owned by) another Webhook: refused; owned by this one: allowed.
    let generated = secret_bound(None, Some("uid-of-another"));
    let (why, message, _) = reason(&generated, &unbound);
    assert_eq!(why, ready_reason::SECRET_NOT_BOUND);
    assert!(
        message.contains("generated for another Webhook"),
        "{message}"
    );
    let own = secret_bound(None, Some(&uid));
    assert!(!uid.is_empty());
    assert_eq!(reason(&own, &unbound).0, ready_reason::ROUTED);
}
