//! Flow control of deliveries to one Webhook: `spec.delivery.rateLimit` and `spec.ordering`
//! (and their validation), in every ingest mode and with two JetStream replicas.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::TryStreamExt;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

use crate::support::{
    CountingReceiver, INGEST_MODES, ModeOperator, NatsServer, Operator, OperatorArgs, api_call,
    control_plane, create_webhook, eventually, metric, one_leader,
};

const SECRET: &str = "a-strong-signing-secret-for-flow-tests";
const EVENTS: usize = 60;

/// The most requests that arrived within any one second.
fn most_in_one_second(arrivals: &[Instant]) -> usize {
    most_within(arrivals, Duration::from_secs(1))
}

/// The most requests that arrived within any `window`.
fn most_within(arrivals: &[Instant], window: Duration) -> usize {
    let mut at = arrivals.to_vec();
    at.sort();
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window).count())
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

/// Two operator processes in jetstream mode with leader election, sharing `nats`; returns
/// them once one leads.
async fn two_jetstream_replicas(
    cp: &crate::support::ControlPlane,
    ns: &str,
    nats: &NatsServer,
) -> (Operator, Operator) {
    let args = OperatorArgs::new(ns)
        .mode("jetstream")
        .nats(&nats.url)
        .leader_elect()
        .fast_lease();
    let (a, b) = (args.start(cp), args.start(cp));
    a.wait_ready().await;
    b.wait_ready().await;
    one_leader(&a, &b).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_jetstream_replicas() {
    let cp = control_plane();
    let ns = cp.namespace("rate-limit-js2").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    let (a, b) = two_jetstream_replicas(cp, &ns, &nats).await;
    create_webhook(
        &client,
        &ns,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"rateLimit": {"perSecond": 20, "burst": 1}}),
    )
    .await;
    // Posted as soon as the Webhook is Ready: a replica that lags routes nothing it has not seen.
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
async fn bad_rate_limits_and_ordering_keys_are_refused_saying_what_to_write() {
    let cp = control_plane();
    let ns = cp.namespace("flow-refused").await;
    let webhook = |delivery: &str| {
        format!(
            "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: w}}\nspec:\n  url: https://example.com/hooks\n  events: [document.completed]\n  secretRef: {{name: s}}\n  {delivery}\n"
        )
    };
    // Sanity: a valid limit is accepted, burst defaulted.
    cp.kubectl_ok(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&webhook(
            "delivery: {rateLimit: {perSecond: 20}}\n  ordering: {key: data.document_id}",
        )),
    )
    .await;
    // So is the example.
    let example = crate::support::repo_root().join("examples/webhook-rate-limited-ordered.yaml");
    cp.kubectl_ok(
        &[
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            &example.to_string_lossy(),
        ],
        None,
    )
    .await;
    let cases: [(&str, &[&str]); 9] = [
        (
            "delivery: {rateLimit: {perSecond: 0}}",
            &["spec.delivery.rateLimit.perSecond", "from 1 to 10000"],
        ),
        (
            "delivery: {rateLimit: {perSecond: 0.5}}",
            &["spec.delivery.rateLimit.perSecond", "integer"],
        ),
        (
            "delivery: {rateLimit: {perSecond: 20000}}",
            &["spec.delivery.rateLimit.perSecond", "from 1 to 10000"],
        ),
        (
            "delivery: {rateLimit: {perSecond: 20, burst: 0}}",
            &["spec.delivery.rateLimit.burst", "from 1 to 10000"],
        ),
        (
            "delivery: {rateLimit: {burst: 5}}",
            &["spec.delivery.rateLimit.perSecond", "Required value"],
        ),
        (
            "ordering: {key: document_id}",
            &["spec.ordering.key", "such as data.document_id"],
        ),
        (
            "ordering: {key: 'data.'}",
            &["spec.ordering.key", "such as data.document_id"],
        ),
        (
            "ordering: {key: 'data.a b'}",
            &["spec.ordering.key", "such as data.document_id"],
        ),
        ("ordering: {}", &["spec.ordering.key", "Required value"]),
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

/// One request as an ordering receiver saw it: (document_id, n, the status it answered).
type Receipt = (String, i64, u16);

/// The requests an ordering receiver answered 200.
fn delivered_ok(receipts: &Mutex<Vec<Receipt>>) -> usize {
    receipts
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.2 == 200)
        .count()
}

/// A receiver that records every request's `data.document_id` and `data.n` in arrival order,
/// and answers 500 to the first `fail` requests for document "A" number 1.
async fn ordering_receiver(fail: usize) -> (Arc<Mutex<Vec<Receipt>>>, SocketAddr) {
    let receipts: Arc<Mutex<Vec<Receipt>>> = Arc::default();
    let seen = receipts.clone();
    let app = axum::Router::new().fallback(axum::routing::post(move |body: axum::body::Bytes| {
        let seen = seen.clone();
        async move {
            let event: Value = serde_json::from_slice(&body).unwrap_or_default();
            let key = event["data"]["document_id"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            let n = event["data"]["n"].as_i64().unwrap_or(-1);
            let mut seen = seen.lock().unwrap();
            let failed_before = seen
                .iter()
                .filter(|(k, m, status)| k == "A" && *m == 1 && *status == 500)
                .count();
            let status = if key == "A" && n == 1 && failed_before < fail {
                500
            } else {
                200
            };
            seen.push((key, n, status));
            axum::http::StatusCode::from_u16(status).unwrap()
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receipts, addr)
}

/// A signing Secret and a Webhook `ordered` with `spec.ordering` on `data.document_id`, short
/// retries; waits until it is Ready.
async fn ordered_webhook(client: &kube::Client, ns: &str, url: &str) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "ordered-secret", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    let webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "ordered"},
        "spec": {
            "url": url, "events": ["*"], "secretRef": {"name": "ordered-secret"},
            "delivery": {"initialBackoffSeconds": 1, "maxBackoffSeconds": 2},
            "ordering": {"key": "data.document_id"},
        },
    }))
    .unwrap();
    webhooks
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();
    crate::support::wait_ready(&webhooks, "ordered").await;
}

/// The events of the ordering tests, in the order they are sent (each in its own request, so
/// that the order of acceptance is this one): keys A and B interleaved.
fn keyed_events() -> Vec<Value> {
    (1..=3)
        .flat_map(|n| {
            ["A", "B"].map(|key| json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z", "data": {"document_id": key, "n": n}}))
        })
        .collect()
}

/// Key A's first event failed three times, then A's events came in order, each once, while
/// B's went through meanwhile; the blocked key was listed in status, then cleared.
async fn assert_ordered(
    client: &kube::Client,
    ns: &str,
    receipts: &Arc<Mutex<Vec<Receipt>>>,
    what: &str,
) {
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    // What status.blockedKeys said while the events went through.
    let listed: Arc<Mutex<Vec<hookrelay::crd::BlockedKey>>> = Arc::default();
    let watcher = {
        let (webhooks, listed) = (webhooks.clone(), listed.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(w) = webhooks.get("ordered").await {
                    let keys = w.status.map(|s| s.blocked_keys).unwrap_or_default();
                    listed.lock().unwrap().extend(keys);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    eventually(
        &format!("{what}: every event delivered"),
        Duration::from_secs(60),
        || async { (delivered_ok(receipts) >= 6).then_some(()) },
    )
    .await;
    watcher.abort();
    let got = receipts.lock().unwrap().clone();
    let of_a: Vec<(i64, u16)> = got
        .iter()
        .filter(|r| r.0 == "A")
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(
        of_a,
        [(1, 500), (1, 500), (1, 500), (1, 200), (2, 200), (3, 200)],
        "{what}: key A out of order or held wrongly: {got:?}"
    );
    let a_through = got
        .iter()
        .position(|r| r.0 == "A" && r.2 == 200)
        .expect("A delivered");
    let of_b: Vec<i64> = got.iter().filter(|r| r.0 == "B").map(|r| r.1).collect();
    assert_eq!(of_b, [1, 2, 3], "{what}: {got:?}");
    assert!(
        got.iter()
            .position(|r| r.0 == "B" && r.1 == 3)
            .is_some_and(|b| b < a_through),
        "{what}: key B waited for key A: {got:?}"
    );
    let blocked = listed.lock().unwrap().clone();
    assert!(
        blocked.iter().any(|k| k.key == "A" && k.attempts >= 1)
            && blocked.iter().all(|k| k.key == "A"),
        "{what}: status.blockedKeys listed {blocked:?} while A's first event was retried"
    );
    eventually(
        &format!("{what}: status.blockedKeys cleared"),
        Duration::from_secs(30),
        || async {
            let status = webhooks.get("ordered").await.ok()?.status?;
            status.blocked_keys.is_empty().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_holds_back_only_the_retrying_key_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("ordering").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let (receipts, addr) = ordering_receiver(3).await;
        ordered_webhook(&client, &ns, &format!("http://{addr}/h")).await;
        for event in keyed_events() {
            op.post_events(&ns, &[event]).await;
        }
        assert_ordered(&client, &ns, &receipts, &format!("{mode:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_holds_across_two_jetstream_replicas() {
    let cp = control_plane();
    let ns = cp.namespace("ordering-js2").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receipts, addr) = ordering_receiver(3).await;
    let (a, b) = two_jetstream_replicas(cp, &ns, &nats).await;
    ordered_webhook(&client, &ns, &format!("http://{addr}/h")).await;
    // Posted as soon as the Webhook is Ready: a replica that lags routes nothing it has not seen.
    // Each event to the other replica: both route, in whatever order their routers run.
    for (i, event) in keyed_events().into_iter().enumerate() {
        let target = [a.listen_addr, b.listen_addr][i % 2];
        let body = Value::Array(vec![event]).to_string();
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
    assert_ordered(&client, &ns, &receipts, "jetstream, two replicas").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_sets_and_shows_the_rate_limit_and_the_ordering() {
    let cp = control_plane();
    let ns = cp.namespace("flow-api").await;
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::Durable, &[&ns], |_| {}).await;
    let api = op.op.op.listen_addr;
    let create = r#"{"url": "https://example.com/h", "events": ["document.completed"],
        "rate_limit": {"per_second": 20}, "ordering": {"key": "data.document_id"}}"#;
    let (status, created) = api_call(
        api,
        "POST",
        &format!("/api/webhooks?namespace={ns}"),
        None,
        Some(create),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["rate_limit"], json!({"per_second": 20, "burst": 1}));
    assert_eq!(created["ordering"], json!({"key": "data.document_id"}));
    assert_eq!(created["blocked_keys"], json!([]));
    let id = created["id"].as_str().unwrap().to_owned();
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(cp.client().await, &ns);
    let spec = webhooks.get(&id).await.unwrap().spec;
    assert_eq!(
        (spec.delivery.rate_limit, spec.ordering.map(|o| o.key)),
        (
            Some(hookrelay::crd::RateLimit {
                per_second: 20,
                burst: 1
            }),
            Some("data.document_id".to_owned())
        )
    );
    // The API server's own message for a bad value.
    let (status, refused) = api_call(
        api,
        "PUT",
        &format!("/api/webhooks/{id}?namespace={ns}"),
        None,
        Some(r#"{"rate_limit": {"per_second": 0}}"#),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("perSecond must be a whole number")),
        "{refused}"
    );
    // null removes them; other delivery settings stay.
    let (status, updated) = api_call(
        api,
        "PUT",
        &format!("/api/webhooks/{id}?namespace={ns}"),
        None,
        Some(r#"{"rate_limit": null, "ordering": null}"#),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (&updated["rate_limit"], &updated["ordering"]),
        (&Value::Null, &Value::Null)
    );
    let spec = webhooks.get(&id).await.unwrap().spec;
    assert_eq!((spec.delivery.rate_limit, spec.ordering), (None, None));
    assert_eq!(spec.delivery.max_attempts, 8);
}

/// (messages not yet handed out, handed out and not acked) of a consumer of the stream.
async fn consumer_counts(nats: &NatsServer, consumer: &str) -> (u64, usize) {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(consumer).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_added_while_deliveries_are_held_on_both_replicas_still_holds() {
    let cp = control_plane();
    let ns = cp.namespace("rate-limit-added").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    let (a, b) = two_jetstream_replicas(cp, &ns, &nats).await;
    create_webhook(
        &client,
        &ns,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({}),
    )
    .await;
    // Posted as soon as the Webhook is Ready: a replica that lags routes nothing it has not seen.
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), &ns);
    let pause = json!({"spec": {"paused": true}});
    webhooks
        .patch(
            "limited",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&pause),
        )
        .await
        .unwrap();
    for op in [&a, &b] {
        let addr = op.metrics_addr;
        eventually("paused on both", Duration::from_secs(60), || async move {
            (metric(addr, "hookrelay_webhooks{state=\"Paused\"}").await == Some(1.0)).then_some(())
        })
        .await;
    }
    // Routed to the shared work queue (no limit yet) and held in hand by both replicas.
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
    eventually(
        "every work item held in hand",
        Duration::from_secs(60),
        || async { (consumer_counts(&nats, "deliverer").await == (0, EVENTS)).then_some(()) },
    )
    .await;
    let resume = json!({"spec": {"paused": false, "delivery": {"rateLimit": {"perSecond": 20, "burst": 1}}}});
    webhooks
        .patch(
            "limited",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&resume),
        )
        .await
        .unwrap();
    assert_limited(&client, &ns, &receiver, "limit added while held").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_parks_deliveries_whose_turn_is_far_off_and_keeps_the_limit() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("rate-limit-park").await;
    let nats = NatsServer::start().await;
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::JetStream, &[&ns], |args| {
        args.nats_url = Some(nats.url.clone())
    })
    .await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"rateLimit": {"perSecond": 1, "burst": 1}}),
    )
    .await;
    // At 1/s, the last of 10 has its turn 9 s away: beyond 5 s they are parked in the stream.
    const N: usize = 10;
    op.post_events(&ns, &events(N)).await;
    eventually("every event delivered", Duration::from_secs(60), || async {
        (receiver.counts().0 >= N).then_some(())
    })
    .await;
    assert_eq!(receiver.counts(), (N, N), "each event once");
    let most = most_in_one_second(&receiver.arrivals.lock().unwrap());
    assert!(most <= 2, "{most} deliveries within one second at 1/s");
    // Parked work items came back to the serial subject as new messages, each deleted once
    // delivered (or parked again): the routed ones stay, and the stream counts the deleted.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    let deleted = stream
        .get_info()
        .await
        .unwrap()
        .state
        .deleted_count
        .unwrap_or(0);
    let serial: usize = stream
        .info_with_subjects("hookrelay.serial.>")
        .await
        .unwrap()
        .try_collect::<std::collections::HashMap<String, usize>>()
        .await
        .unwrap()
        .values()
        .sum();
    assert!(
        serial == N && deleted > 0,
        "{serial} serial messages, {deleted} deleted: nothing was parked, or its copies stayed"
    );
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), &ns);
    let status = eventually(
        "every attempt recorded",
        Duration::from_secs(30),
        || async {
            let status = webhooks.get("limited").await.ok()?.status?;
            (status.delivery_stats.succeeded == N as i64).then_some(status)
        },
    )
    .await;
    assert!(
        status.recent_deliveries.iter().all(|r| r.attempt == 1),
        "parking for the turn spent an attempt: {:?}",
        status.recent_deliveries
    );
}

/// Kills `op` (SIGKILL) while key A's head is retrying, starts the operator again with `args`,
/// and asserts that A's three events were delivered in order and that none was sent while the
/// head had not gone through; prints the test's FIGURES line.
async fn the_head_keeps_its_turn_across_a_kill(
    test: &str,
    cp: &crate::support::ControlPlane,
    mut op: Operator,
    args: &OperatorArgs,
    receipts: &Arc<Mutex<Vec<Receipt>>>,
) {
    op.child.kill().await.expect("kill -9");
    let before = receipts.lock().unwrap().len();
    let killed = Instant::now();
    let op = args.start(cp);
    op.wait_ready().await;
    eventually(
        "every event delivered",
        Duration::from_secs(120),
        || async { (delivered_ok(receipts) >= 3).then_some(()) },
    )
    .await;
    let got = receipts.lock().unwrap().clone();
    let head_through = got
        .iter()
        .position(|r| r.1 == 1 && r.2 == 200)
        .expect("the head delivered");
    let overtook: Vec<&Receipt> = got[..head_through].iter().filter(|r| r.1 != 1).collect();
    let delivered: Vec<i64> = got.iter().filter(|r| r.2 == 200).map(|r| r.1).collect();
    println!(
        "FIGURES {test}: requests before the kill={before} after={} delivered order={delivered:?} all delivered {:.1}s after the kill",
        got.len() - before,
        killed.elapsed().as_secs_f64()
    );
    assert!(
        overtook.is_empty(),
        "later events were sent while the head was retrying: {overtook:?} (all: {got:?})"
    );
    assert_eq!(delivered, [1, 2, 3], "{got:?}");
    drop(op);
}

/// A retrying head of an ordering key keeps its turn across a kill -9 of the operator: after the
/// restart the list brings the key's later events first (their names sort before the head's),
/// and they still wait until the head is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_holds_across_a_kill_of_the_operator_with_a_retrying_head() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("ordering-kill").await;
    let (receipts, addr) = ordering_receiver(3).await;
    let args = OperatorArgs::new(&ns);
    let op = args.start(cp);
    op.wait_ready().await;
    ordered_webhook(&client, &ns, &format!("http://{addr}/h")).await;
    // In this order, each with the acceptance time ingest writes (a producer creating them
    // itself may write it too); names chosen so that a list, which comes in name order, brings
    // them backwards.
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let accepted = k8s_openapi::jiff::Timestamp::now();
    for (name, n) in [("z-first", 1), ("m-second", 2), ("a-third", 3)] {
        let at = accepted + k8s_openapi::jiff::SignedDuration::from_micros(n);
        let de = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
            "metadata": {"name": name, "annotations": {"hookrelay.dev/accepted-at": at.to_string()}},
            "spec": {"type": "document.completed", "data": {"document_id": "A", "n": n}},
        }))
        .unwrap();
        events.create(&PostParams::default(), &de).await.unwrap();
    }
    // The head has failed and its attempt is in its status: it is retrying.
    eventually(
        "the head's failed attempt recorded",
        Duration::from_secs(60),
        || async {
            let de = events.get("z-first").await.ok()?;
            de.status?
                .deliveries
                .iter()
                .any(|t| t.attempts >= 1)
                .then_some(())
        },
    )
    .await;
    the_head_keeps_its_turn_across_a_kill("ordering_holds_across_a_kill", cp, op, &args, &receipts)
        .await;
}

/// The same in JetStream mode: the head's work item is in hand when the process is killed, and
/// comes back after the ack wait; the key's later events still wait for it, and nothing stalls
/// waiting for a new event to release them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_ordering_holds_across_a_kill_of_the_operator_with_a_retrying_head() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("ordering-kill-js").await;
    let nats = NatsServer::start().await;
    let (receipts, addr) = ordering_receiver(3).await;
    let args = OperatorArgs::new(&ns).mode("jetstream").nats(&nats.url);
    let op = args.start(cp);
    op.wait_ready().await;
    ordered_webhook(&client, &ns, &format!("http://{addr}/h")).await;
    for n in 1..=3 {
        let body = json!([{"event": "document.completed", "data": {"document_id": "A", "n": n}}]);
        let (status, reply) = api_call(
            op.listen_addr,
            "POST",
            &format!("/api/events?namespace={ns}"),
            None,
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 202, "{reply}");
    }
    eventually("the head failed once", Duration::from_secs(60), || async {
        (!receipts.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    the_head_keeps_its_turn_across_a_kill(
        "jetstream_ordering_holds_across_a_kill",
        cp,
        op,
        &args,
        &receipts,
    )
    .await;
}

/// A backlog far beyond what the limit lets go within `TURN_WAIT_IN_HAND` is parked in the
/// stream until about its turn: each work item is republished a bounded number of times (here
/// at most twice), not once per few seconds of its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_backlog_is_parked_a_bounded_number_of_times() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("rate-limit-backlog").await;
    let nats = NatsServer::start().await;
    // The operator binary, not in this process: 5,000 deliveries in here would slow the
    // timing of the tests running beside this one.
    let op = OperatorArgs::new(&ns)
        .mode("jetstream")
        .nats(&nats.url)
        .start(cp);
    op.wait_ready().await;
    let (receiver, addr) = CountingReceiver::start().await;
    const PER_SECOND: usize = 50;
    create_webhook(
        &client,
        &ns,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"rateLimit": {"perSecond": PER_SECOND, "burst": 1}}),
    )
    .await;
    // 100 s of work at 50/s.
    const N: usize = 5_000;
    for chunk in events(N).chunks(1_000) {
        let body = Value::Array(chunk.to_vec()).to_string();
        let path = format!("/api/events?namespace={ns}");
        let (status, reply) = api_call(op.listen_addr, "POST", &path, None, Some(&body)).await;
        assert_eq!(status, 202, "{reply}");
    }
    let started = Instant::now();
    // Watched for up to four minutes (the limit alone needs 100 s), so that the figures are
    // printed however it goes.
    let watch_for = Duration::from_secs(240);
    while receiver.counts().0 < N && started.elapsed() < watch_for {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let delivered = receiver.counts().0;
    // Every parked work item comes back to the serial subject as a new message (and a parked
    // one not yet due waits on its schedule subject).
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    let count = |filter: &'static str| {
        let stream = stream.clone();
        async move {
            stream
                .info_with_subjects(filter)
                .await
                .unwrap()
                .try_collect::<std::collections::HashMap<String, usize>>()
                .await
                .unwrap()
                .values()
                .sum::<usize>()
        }
    };
    let serial = count("hookrelay.serial.>").await;
    let scheduled = count("hookrelay.schedules.>").await;
    let republished = serial.saturating_sub(N) + scheduled;
    let (most, most_in_ten) = {
        let arrivals = receiver.arrivals.lock().unwrap();
        (
            most_in_one_second(&arrivals),
            most_within(&arrivals, Duration::from_secs(10)),
        )
    };
    println!(
        "FIGURES a_rate_limited_backlog_is_parked_a_bounded_number_of_times: {republished} \
         republished (parked) messages for {N} events at {PER_SECOND}/s ({serial} on the serial \
         subject, {scheduled} still scheduled); {delivered} delivered in {took:.0} s; at most \
         {most} arrived in one second, {most_in_ten} in ten"
    );
    assert_eq!(delivered, N, "every event delivered within {watch_for:?}");
    assert_eq!(receiver.counts(), (N, N), "each event once");
    // The limit over ten seconds, allowing arrivals seen up to 200 ms late: arrival times are
    // taken in this busy test process, and 20 ms spacing shows that jitter (with the operator
    // in this process, 58 within one second were seen with the old parking, 56 and 506 within
    // ten with the new; the other tests check one second at 20/s and 1/s).
    assert!(
        most_in_ten <= 10 * PER_SECOND + 1 + PER_SECOND / 5,
        "{most_in_ten} deliveries within ten seconds at {PER_SECOND}/s"
    );
    assert!(
        republished <= 2 * N,
        "{republished} republished messages for a backlog of {N}: more than 2 per event"
    );
}
