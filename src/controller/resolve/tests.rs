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
