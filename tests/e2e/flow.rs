//! Flow control of deliveries to one Webhook: `spec.delivery.rateLimit` (and its validation),
//! in every ingest mode and with two JetStream replicas.

use std::time::{Duration, Instant};

use kube::Api;
use serde_json::{Value, json};

use crate::support::{
    CountingReceiver, INGEST_MODES, ModeOperator, NatsServer, Operator, api_call, control_plane,
    create_webhook, eventually, metric,
};

const SECRET: &str = "a-strong-signing-secret-for-flow-tests";
const EVENTS: usize = 60;

/// The most requests that arrived within any one second.
fn most_in_one_second(arrivals: &[Instant]) -> usize {
    let mut at = arrivals.to_vec();
    at.sort();
    (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| **t < at[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn events(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z", "data": {"document_id": i}}))
        .collect()
}

/// Every event arrived once, never more than 21 within a second (20/s, burst 1), and the
/// Webhook's history shows each delivered at its first attempt.
async fn assert_limited(client: &kube::Client, ns: &str, receiver: &CountingReceiver, what: &str) {
    eventually(
        &format!("{what}: all {EVENTS} events delivered"),
        Duration::from_secs(90),
        || async { (receiver.counts().0 >= EVENTS).then_some(()) },
    )
    .await;
    assert_eq!(
        receiver.counts(),
        (EVENTS, EVENTS),
        "{what}: each event once"
    );
    let most = most_in_one_second(&receiver.arrivals.lock().unwrap());
    println!("{what}: at most {most} deliveries in one second");
    assert!(most <= 21, "{what}: {most} deliveries within one second");
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    let status = eventually(
        &format!("{what}: every attempt in the history"),
        Duration::from_secs(30),
        || async {
            let status = webhooks.get("limited").await.ok()?.status?;
            (status.delivery_stats.succeeded == EVENTS as i64).then_some(status)
        },
    )
    .await;
    assert_eq!(status.delivery_stats.failed, 0, "{what}");
    assert_eq!(status.recent_deliveries.len(), 20, "{what}");
    assert!(
        status.recent_deliveries.iter().all(|r| r.attempt == 1),
        "{what}: waiting for the limit spent an attempt: {:?}",
        status.recent_deliveries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_spaces_deliveries_without_spending_attempts_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("rate-limit").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let (receiver, addr) = CountingReceiver::start().await;
        create_webhook(
            &client,
            &ns,
            "limited",
            &format!("http://{addr}/h"),
            SECRET,
            json!({"rateLimit": {"perSecond": 20, "burst": 1}}),
        )
        .await;
        for chunk in events(EVENTS).chunks(20) {
            op.post_events(&ns, chunk).await;
        }
        assert_limited(&client, &ns, &receiver, &format!("{mode:?}")).await;
        let waited = metric(op.op.op.metrics_addr, "hookrelay_rate_limited_total").await;
        assert!(
            waited.is_some_and(|n| n >= 30.0),
            "{mode:?}: hookrelay_rate_limited_total is {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_jetstream_replicas() {
    let cp = control_plane();
    let ns = cp.namespace("rate-limit-js2").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    let start = || {
        Operator::start(
            cp,
            &[
                "--namespace",
                &ns,
                "--allow-http",
                "--allow-cidr",
                "127.0.0.0/8",
                "--disable-auth",
                "--ingest-mode",
                "jetstream",
                "--nats-url",
                &nats.url,
                "--leader-elect",
                "--lease-namespace",
                &ns,
                "--lease-duration",
                "6s",
                "--renew-deadline",
                "4s",
                "--retry-period",
                "1s",
            ],
        )
    };
    let (a, b) = (start(), start());
    a.wait_ready().await;
    b.wait_ready().await;
    let (ra, rb) = (&a, &b);
    eventually("one leader", Duration::from_secs(60), move || async move {
        let leader = |op: &Operator| metric(op.metrics_addr, "hookrelay_leader");
        match (leader(ra).await?, leader(rb).await?) {
            (1.0, 0.0) | (0.0, 1.0) => Some(()),
            _ => None,
        }
    })
    .await;
    create_webhook(
        &client,
        &ns,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"rateLimit": {"perSecond": 20, "burst": 1}}),
    )
    .await;
    for op in [&a, &b] {
        let addr = op.metrics_addr;
        eventually(
            "the webhook routed on both",
            Duration::from_secs(60),
            || async move {
                (metric(addr, "hookrelay_webhooks{state=\"Active\"}").await == Some(1.0))
                    .then_some(())
            },
        )
        .await;
    }
    // Both replicas take events and route them; both consume the shared work queue.
    for (i, chunk) in events(EVENTS).chunks(10).enumerate() {
        let target = [a.listen_addr, b.listen_addr][i % 2];
        let body = Value::Array(chunk.to_vec()).to_string();
        let (status, reply) = api_call(
            target,
            "POST",
            &format!("/api/events?namespace={ns}"),
            None,
            Some(&body),
        )
        .await;
        assert_eq!(status, 202, "{reply}");
    }
    assert_limited(&client, &ns, &receiver, "jetstream, two replicas").await;
}

#[tokio::test]
async fn out_of_range_rate_limits_are_refused_saying_what_to_write() {
    let cp = control_plane();
    let ns = cp.namespace("flow-refused").await;
    let webhook = |delivery: &str| {
        format!(
            "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: w}}\nspec:\n  url: https://example.com/hooks\n  events: [document.completed]\n  secretRef: {{name: s}}\n  delivery: {delivery}\n"
        )
    };
    // Sanity: a valid limit is accepted, burst defaulted.
    cp.kubectl_ok(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&webhook("{rateLimit: {perSecond: 20}}")),
    )
    .await;
    let cases: [(&str, &[&str]); 5] = [
        (
            "{rateLimit: {perSecond: 0}}",
            &["spec.delivery.rateLimit.perSecond", "from 1 to 10000"],
        ),
        (
            "{rateLimit: {perSecond: 0.5}}",
            &["spec.delivery.rateLimit.perSecond", "integer"],
        ),
        (
            "{rateLimit: {perSecond: 20000}}",
            &["spec.delivery.rateLimit.perSecond", "from 1 to 10000"],
        ),
        (
            "{rateLimit: {perSecond: 20, burst: 0}}",
            &["spec.delivery.rateLimit.burst", "from 1 to 10000"],
        ),
        (
            "{rateLimit: {burst: 5}}",
            &["spec.delivery.rateLimit.perSecond", "Required value"],
        ),
    ];
    let mut failures = Vec::new();
    for (delivery, expected) in cases {
        let out = cp
            .kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&webhook(delivery)))
            .await;
        if out.success {
            failures.push(format!("{delivery}: accepted"));
            continue;
        }
        for needle in expected {
            if !out.stderr.contains(needle) {
                failures.push(format!("{delivery}: lacks {needle:?}: {}", out.stderr));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
