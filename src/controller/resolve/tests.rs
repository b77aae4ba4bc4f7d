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
        r.ready.message.contains("--allow-http"),
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
