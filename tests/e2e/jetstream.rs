//! `--ingest-mode jetstream` against a real nats-server (JetStream on a loopback port), a real
//! API server and loopback receivers.

use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use hookrelay::http::IngestMode;
use serde_json::{Value, json};

use crate::support::{
    CountingReceiver, InProcess, ModeOperator, NatsServer, OperatorArgs, Receiver, ReceiverKind,
    control_plane, create_webhook, eventually, ingest_args, metric, metric_with, one_leader,
    post_events, wait_ready_reason,
};
use crate::support::{counting_webhook, set_paused};

const SECRET: &str = "a-strong-signing-secret-for-jetstream-tests";
const EVENT: &str = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123,"filename":"important_document.pdf"}}"#;

/// Messages per subject in the stream.
async fn subjects(nats: &NatsServer) -> std::collections::HashMap<String, usize> {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    stream
        .info_with_subjects("hookrelay.>")
        .await
        .unwrap()
        .try_fold(
            Default::default(),
            |mut all: std::collections::HashMap<_, _>, (s, n)| {
                all.insert(s, n);
                std::future::ready(Ok(all))
            },
        )
        .await
        .unwrap()
}

/// A counting Webhook `w` in `ns`, then one event posted to the operator at `api`: it is taken
/// (202) and delivered once.
async fn delivers_one_event(
    cp: &crate::support::ControlPlane,
    ns: &str,
    api: std::net::SocketAddr,
) {
    let receiver = counting_webhook(&cp.client().await, ns, "w", SECRET).await;
    let (status, reply) = post_events(api, ns, None, EVENT).await;
    assert_eq!(status, 202, "{reply}");
    eventually("the delivery", Duration::from_secs(60), || async {
        (receiver.counts() == (1, 1)).then_some(())
    })
    .await;
}

/// Whether the deliverer consumer has nothing pending, handed out or waiting to be redelivered.
async fn deliverer_idle(nats: &NatsServer) -> bool {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("deliverer").await.unwrap();
    let info = consumer.info().await.unwrap();
    info.num_pending == 0 && info.num_ack_pending == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_ingest_answers_after_the_publish_and_delivers_a_signed_event() {
    let cp = control_plane();
    let ns = cp.namespace("js-ingest").await;
    let nats = NatsServer::start().await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let client = cp.client().await;
    let receiver = Receiver::start(ReceiverKind::Python, SECRET, &[]).await;
    create_webhook(&client, &ns, "w", &receiver.url("/h"), SECRET, json!({})).await;

    let (status, reply) = post_events(op.op.listen_addr, &ns, None, EVENT).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["mode"], "jetstream", "{reply}");
    assert_eq!(reply["accepted"], 1, "{reply}");
    // Stored before the reply: routed by the replica that took it in, as its one work item;
    // the event itself goes to no router.
    let stored = subjects(&nats).await;
    assert_eq!(
        stored.get(&format!("hookrelay.deliveries.{ns}.w")),
        Some(&1),
        "{stored:?}"
    );
    assert_eq!(
        stored.get(&format!("hookrelay.events.{ns}")),
        None,
        "{stored:?}"
    );

    let received = receiver.wait_ok(1).await;
    assert_eq!(received.len(), 1, "{received:?}");
    let r = &received[0];
    assert!(
        r.hex_ok,
        "the contract's verification accepts the signature: {r:?}"
    );
    assert_eq!(r.event.as_deref(), Some("document.completed"));
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body, serde_json::from_str::<Value>(EVENT).unwrap());
    assert!(r.delivery_id.as_deref().unwrap().starts_with("msg_"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_event_sent_twice_with_one_key_is_stored_and_delivered_once() {
    let cp = control_plane();
    let ns = cp.namespace("js-idem").await;
    let nats = NatsServer::start().await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let client = cp.client().await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;

    let (status, first) = post_events(op.op.listen_addr, &ns, Some("order-1"), EVENT).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["duplicates"], json!([]), "{first}");
    let (status, again) = post_events(op.op.listen_addr, &ns, Some("order-1"), EVENT).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["duplicates"], json!([0]), "{again}");
    assert_eq!(again["events"], first["events"], "the same event id");
    let other = EVENT.replace("123", "124");
    let (status, conflict) = post_events(op.op.listen_addr, &ns, Some("order-1"), &other).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");

    eventually("one delivery", Duration::from_secs(60), || async {
        (receiver.counts() == (1, 1)).then_some(())
    })
    .await;
    eventually(
        "the deliverer to be idle",
        Duration::from_secs(60),
        || async { deliverer_idle(&nats).await.then_some(()) },
    )
    .await;
    let subjects = subjects(&nats).await;
    assert_eq!(
        subjects.get(&format!("hookrelay.events.{ns}")),
        Some(&1),
        "{subjects:?}"
    );
    assert_eq!(
        subjects.get(&format!("hookrelay.deliveries.{ns}.w")),
        Some(&1),
        "{subjects:?}"
    );
    assert_eq!(receiver.counts(), (1, 1), "delivered once");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_delivery_is_retried_through_the_stream_with_one_delivery_id() {
    let cp = control_plane();
    let ns = cp.namespace("js-retry").await;
    let nats = NatsServer::start().await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let client = cp.client().await;
    let receiver = Receiver::start(ReceiverKind::Python, SECRET, &["--fail-first", "2"]).await;
    create_webhook(
        &client,
        &ns,
        "w",
        &receiver.url("/h"),
        SECRET,
        json!({"initialBackoffSeconds": 1, "maxBackoffSeconds": 2}),
    )
    .await;

    let (status, reply) = post_events(op.op.listen_addr, &ns, None, EVENT).await;
    assert_eq!(status, 202, "{reply}");
    let received = receiver.wait_ok(1).await;
    let statuses: Vec<u16> = received.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200], "{received:?}");
    let ids: std::collections::HashSet<_> =
        received.iter().map(|r| r.delivery_id.clone()).collect();
    assert_eq!(ids.len(), 1, "one delivery id for every attempt: {ids:?}");

    // The attempts are numbered 1, 2, 3 in the Webhook's history.
    let webhooks: kube::Api<hookrelay::crd::Webhook> = kube::Api::namespaced(client, &ns);
    let attempts = eventually(
        "three attempts recorded",
        Duration::from_secs(60),
        || async {
            let w = webhooks.get("w").await.ok()?;
            let mut attempts: Vec<i32> = w
                .status?
                .recent_deliveries
                .iter()
                .map(|r| r.attempt)
                .collect();
            attempts.sort();
            (attempts.len() == 3).then_some(attempts)
        },
    )
    .await;
    assert_eq!(attempts, [1, 2, 3]);
    op.stop().await;
}

/// A JetStream operator watching `ns` with `--nats-max-ack-pending 20` (few held items in hand:
/// the rest are parked), and a counting Webhook `paused` there, paused.
async fn held_webhook(
    cp: &crate::support::ControlPlane,
    client: &kube::Client,
    ns: &str,
) -> (ModeOperator, CountingReceiver) {
    let op = ModeOperator::start(cp, IngestMode::JetStream, &[ns], |args| {
        args.nats_max_ack_pending = 20;
    })
    .await;
    let paused = counting_webhook(client, ns, "paused", SECRET).await;
    set_paused(client, ns, "paused", true).await;
    wait_ready_reason(client, ns, "paused", "False", "Paused").await;
    (op, paused)
}

// Fairness: held deliveries are parked in the stream, not kept in the consumer's
// pending, so a paused Webhook with more of them than max_ack_pending does not stop the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_webhook_holding_more_than_max_ack_pending_does_not_stop_the_others() {
    let cp = control_plane();
    let ns = cp.namespace("js-held").await;
    let client = cp.client().await;
    let (op, paused) = held_webhook(cp, &client, &ns).await;
    let webhooks: kube::Api<hookrelay::crd::Webhook> = kube::Api::namespaced(client.clone(), &ns);
    let live = counting_webhook(&client, &ns, "live", SECRET).await;

    // Every event goes to both: 50 held deliveries, more than twice max_ack_pending.
    const EVENTS: usize = 50;
    let events: Vec<Value> = (0..EVENTS)
        .map(|i| json!({"event": "document.completed", "data": {"document_id": i}}))
        .collect();
    op.post_events(&ns, &events).await;
    eventually(
        "every event at the live Webhook",
        Duration::from_secs(60),
        || async { (live.counts() == (EVENTS, EVENTS)).then_some(()) },
    )
    .await;
    assert_eq!(paused.counts(), (0, 0), "nothing sent while paused");

    set_paused(&client, &ns, "paused", false).await;
    eventually(
        "every held delivery sent once resumed",
        Duration::from_secs(120),
        || async { (paused.counts().0 == EVENTS).then_some(()) },
    )
    .await;
    // Holding spent no attempt: each held delivery went out as its first attempt.
    let attempts = eventually(
        "the resumed Webhook's history",
        Duration::from_secs(60),
        || async {
            let s = webhooks.get("paused").await.ok()?.status?;
            (s.recent_deliveries.len() >= 20).then_some(s.recent_deliveries)
        },
    )
    .await;
    assert!(
        attempts.iter().all(|r| r.attempt == 1),
        "{:?}",
        attempts.iter().map(|r| r.attempt).collect::<Vec<_>>()
    );
}

/// A held delivery is parked again and again (back in 1, 2, 4 ... 30 s), each park a copy of
/// the event in the stream, which keeps what it holds for `--nats-max-age`. A copy is deleted
/// once a newer one supersedes it: a held Webhook's items take one live copy each however long
/// the hold lasts, rather than one more copy of each event per park.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_webhooks_parked_copies_do_not_pile_up_in_the_stream() {
    let cp = control_plane();
    let ns = cp.namespace("js-copies").await;
    let client = cp.client().await;
    let (op, paused) = held_webhook(cp, &client, &ns).await;
    const EVENTS: usize = 50;
    let events: Vec<Value> = (0..EVENTS)
        .map(|i| json!({"event": "document.completed", "data": {"document_id": i}}))
        .collect();
    op.post_events(&ns, &events).await;
    // Parked about four times each by now (back after 1, 2, 4 and 8 s, each spread over its
    // second half).
    tokio::time::sleep(Duration::from_secs(16)).await;
    let nats = op.nats().expect("a jetstream operator has its nats-server");
    let held: usize = subjects(nats)
        .await
        .into_iter()
        .filter(|(subject, _)| {
            subject.starts_with(&format!("hookrelay.deliveries.{ns}.paused"))
                || subject.starts_with(&format!("hookrelay.schedules.{ns}.paused."))
        })
        .map(|(_, n)| n)
        .sum();
    println!(
        "FIGURES jetstream::parked_copies events={EVENTS} held_for_s=16 messages_for_the_held_webhook={held}"
    );
    assert_eq!(paused.counts(), (0, 0), "nothing sent while paused");
    // Each event's routed work item, its live copy and its pending schedule at most.
    assert!(
        held <= 3 * EVENTS,
        "{held} messages for {EVENTS} held deliveries: parked copies pile up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_jetstream_operator_loses_no_event() {
    let cp = control_plane();
    let ns = cp.namespace("js-kill").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start_slow(Duration::from_millis(100)).await;
    // The binary, so that it can be killed with SIGKILL.
    let args = OperatorArgs::new(&ns).mode("jetstream").nats(&nats.url);
    let mut first = args.start(cp);
    first.wait_ready().await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({}),
    )
    .await;

    const EVENTS: usize = 100;
    let batch = format!("[{}]", vec![EVENT; EVENTS].join(","));
    let (status, reply) = post_events(first.listen_addr, &ns, None, &batch).await;
    assert_eq!(status, 202, "{reply}");
    eventually("some deliveries", Duration::from_secs(60), || async {
        (receiver.counts().0 >= 10).then_some(())
    })
    .await;
    first.child.start_kill().unwrap(); // SIGKILL
    first.child.wait().await.unwrap();
    let at_kill = receiver.counts().0;
    assert!(at_kill < EVENTS, "events were outstanding at the kill");

    let restarted = std::time::Instant::now();
    let second = args.start(cp);
    second.wait_ready().await;
    eventually(
        "every event delivered",
        Duration::from_secs(120),
        || async { (receiver.counts().0 == EVENTS).then_some(()) },
    )
    .await;
    let (distinct, total) = receiver.counts();
    eprintln!(
        "FIGURES a_killed_jetstream_operator_loses_no_event: sent={EVENTS} delivered={distinct} \
         duplicates={} lost={} recover_s={:.1} delivered_before_kill={at_kill} build=debug",
        total - distinct,
        EVENTS - distinct,
        restarted.elapsed().as_secs_f64(),
    );
}

/// "With two replicas, each delivers a share" and "The Webhook status stays correct
/// and bounded in patches when several replicas deliver". Two replicas (leader election on)
/// share 200 deliveries, each making some; every attempt, the
/// follower's included, is counted in the Webhook's `deliveryStats` and the newest are in
/// `recentDeliveries`, while only the leader patches, at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_record_every_attempt_in_the_webhook_status() {
    let cp = control_plane();
    let ns = cp.namespace("js-status").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start_slow(Duration::from_millis(20)).await;
    let args = OperatorArgs::new(&ns)
        .mode("jetstream")
        .nats(&nats.url)
        .leader_elect()
        .fast_lease();
    let (a, b) = (args.start(cp), args.start(cp));
    a.wait_ready().await;
    b.wait_ready().await;
    let (leader, follower) = match one_leader(&a, &b).await {
        0 => (&a, &b),
        _ => (&b, &a),
    };
    let started = std::time::Instant::now();
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({}),
    )
    .await;
    // Posted as soon as the Webhook is Ready: a replica that lags routes nothing it has not seen.

    const EVENTS: usize = 200;
    for chunk in 0..EVENTS / 20 {
        let batch = format!("[{}]", vec![EVENT; 20].join(","));
        let target = [a.listen_addr, b.listen_addr][chunk % 2];
        let (status, reply) = post_events(target, &ns, None, &batch).await;
        assert_eq!(status, 202, "{reply}");
    }
    eventually(
        "every event delivered",
        Duration::from_secs(120),
        || async { (receiver.counts().0 == EVENTS).then_some(()) },
    )
    .await;
    // A replica counts an attempt once the answer is back, just after the receiver counted it.
    let (attempts, succeeded) = (
        "hookrelay_delivery_attempts_total",
        &[("outcome", "Succeeded"), ("status_class", "2xx")],
    );
    let (by_leader, by_follower) = eventually(
        "every request counted as an attempt",
        Duration::from_secs(30),
        || async {
            let by_leader = metric_with(leader.metrics_addr, attempts, succeeded)
                .await
                .unwrap_or(0.0);
            let by_follower = metric_with(follower.metrics_addr, attempts, succeeded)
                .await
                .unwrap_or(0.0);
            (by_leader + by_follower == receiver.counts().1 as f64)
                .then_some((by_leader, by_follower))
        },
    )
    .await;
    assert!(
        by_leader > 0.0 && by_follower > 0.0,
        "each replica delivered some: {by_leader} / {by_follower}"
    );
    let total = by_leader + by_follower;

    let webhooks: kube::Api<hookrelay::crd::Webhook> = kube::Api::namespaced(client, &ns);
    let status = eventually(
        "every attempt counted in the Webhook's status",
        Duration::from_secs(60),
        || async {
            let status = webhooks.get("w").await.ok()?.status?;
            (status.delivery_stats.succeeded as f64 == total).then_some(status)
        },
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(status.delivery_stats.failed, 0);
    let recent = &status.recent_deliveries;
    assert_eq!(
        recent.len(),
        hookrelay::status::RECENT_DELIVERIES,
        "{recent:?}"
    );
    let ids: std::collections::HashSet<_> = recent.iter().map(|r| &r.id).collect();
    assert_eq!(
        ids.len(),
        recent.len(),
        "one record per delivery: {recent:?}"
    );
    assert!(
        recent
            .iter()
            .all(|r| r.outcome == hookrelay::crd::Outcome::Succeeded && r.attempt == 1),
        "{recent:?}"
    );

    // Every record went through the stream, and the leader took them all.
    let records = |path: &str| format!("hookrelay_attempt_records_total{{path=\"{path}\"}}");
    let (published, received) = (records("published"), records("received"));
    // The follower counts a publish once its acknowledgement is back, which can be after the
    // leader has taken the record.
    eventually(
        "the follower's records counted as published",
        Duration::from_secs(30),
        || async {
            (metric(follower.metrics_addr, &published).await == Some(by_follower)).then_some(())
        },
    )
    .await;
    assert_eq!(metric(leader.metrics_addr, &received).await, Some(total));
    assert_eq!(
        metric(follower.metrics_addr, &records("received")).await,
        Some(0.0),
        "a follower takes no record"
    );

    // Only the leader patches the Webhook, at most once a second for its history (plus its
    // Ready condition), however many replicas deliver.
    let patches = |addr| async move {
        let mut n = 0.0;
        for result in ["Ok", "Error"] {
            let series =
                format!("hookrelay_status_patches_total{{kind=\"Webhook\",result=\"{result}\"}}");
            n += metric(addr, &series).await.unwrap_or(0.0);
        }
        n
    };
    assert_eq!(patches(follower.metrics_addr).await, 0.0);
    let by_leader_patches = patches(leader.metrics_addr).await;
    let bound = elapsed.as_secs_f64().ceil() + 3.0;
    println!(
        "{total} attempts ({by_leader} by the leader, {by_follower} by the follower) in {elapsed:?}: {by_leader_patches} Webhook patches (bound {bound})"
    );
    assert!(
        by_leader_patches <= bound,
        "{by_leader_patches} patches in {elapsed:?}"
    );
}

/// `--nats-tls-ca-file`: the operator reaches a nats-server that requires TLS with the CA of its
/// certificate, and delivers; without it, or with an unreadable file, it refuses to start
/// saying which flag to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_tls_needs_the_servers_ca() {
    let cp = control_plane();
    let ns = cp.namespace("js-tls").await;
    let (nats, certs) = NatsServer::start_tls().await;
    let client = cp.client().await;
    let args = || ingest_args(&[&ns], IngestMode::JetStream, Some(&nats));
    let refused = |args| async { InProcess::start_error(cp.config().await, args).await };

    let error = refused(args()).await;
    assert!(error.contains("cannot connect to NATS"), "{error}");
    assert!(error.contains("--nats-tls-ca-file"), "{error}");

    let mut missing = args();
    missing.nats_tls_ca_file = Some(certs.ca.with_file_name("absent.crt"));
    let error = refused(missing).await;
    assert!(
        error.contains("cannot use --nats-tls-ca-file") && error.contains("absent.crt"),
        "{error}"
    );
    let mut not_pem = args();
    not_pem.nats_tls_ca_file = Some(certs.key.clone());
    let error = refused(not_pem).await;
    assert!(error.contains("no PEM certificate"), "{error}");

    let mut with_ca = args();
    with_ca.nats_tls_ca_file = Some(certs.ca.clone());
    let op = InProcess::start_with(cp.config().await, with_ca).await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    let addr = op.op.metrics_addr;
    eventually(
        "the webhook routed",
        Duration::from_secs(60),
        || async move {
            (metric(addr, "hookrelay_webhooks{state=\"Active\"}").await == Some(1.0)).then_some(())
        },
    )
    .await;
    let (status, reply) = post_events(op.op.listen_addr, &ns, None, EVENT).await;
    assert_eq!(status, 202, "{reply}");
    eventually("the event delivered", Duration::from_secs(60), || async {
        (receiver.counts() == (1, 1)).then_some(())
    })
    .await;
    op.stop().await;
}

/// Posts `body`, answering (status, Retry-After, reply).
async fn post_with_retry_after(
    addr: std::net::SocketAddr,
    ns: &str,
    body: &str,
) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/events?namespace={ns}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap_or_default();
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

async fn stream_config(nats: &NatsServer) -> jetstream::stream::Config {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    js.get_stream("HOOKRELAY")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone()
}

fn assert_full_refusal(status: u16, retry_after: Option<&str>, reply: &Value) {
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"]["code"], "jetstream_full", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("full") && message.contains("--nats-max-bytes"),
        "says what is wrong and what to raise: {message}"
    );
    let retry_after: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
    assert!(retry_after >= 1, "{retry_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_ingest_with_503_and_every_event_taken_is_delivered() {
    const MAX_MESSAGES: i64 = 400;
    let cp = control_plane();
    let ns = cp.namespace("js-full").await;
    let nats = NatsServer::start().await;
    let mut args = ingest_args(&[&ns], IngestMode::JetStream, Some(&nats));
    args.nats_max_messages = MAX_MESSAGES;
    let op = InProcess::start_with(cp.config().await, args).await;
    let client = cp.client().await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;

    let config = stream_config(&nats).await;
    assert_eq!(config.max_messages, MAX_MESSAGES);
    assert_eq!(config.max_bytes, 1 << 30, "the default, 1GiB");
    // The only policy nats-server allows with message schedules: ingest keeps it from ever
    // discarding anything.
    assert_eq!(config.discard, jetstream::stream::DiscardPolicy::Old);

    // A request that does not fit is refused whole.
    let batch = format!("[{}]", vec![EVENT; 300].join(","));
    let (status, retry_after, reply) = post_with_retry_after(op.op.listen_addr, &ns, &batch).await;
    assert_full_refusal(status, retry_after.as_deref(), &reply);
    assert_eq!(
        subjects(&nats).await.get(&format!("hookrelay.events.{ns}")),
        None
    );

    // One event a request, as a client sends them, until the stream is full: each event takes
    // two messages (its work item, routed as it is taken in, and the attempt record).
    let mut accepted = 0;
    let refusal = loop {
        assert!(accepted < MAX_MESSAGES, "never refused");
        let (status, retry_after, reply) =
            post_with_retry_after(op.op.listen_addr, &ns, EVENT).await;
        match status {
            202 => accepted += 1,
            _ => break (status, retry_after, reply),
        }
    };
    let (status, retry_after, reply) = refusal;
    assert_full_refusal(status, retry_after.as_deref(), &reply);
    assert_eq!(
        reply["error"]["stored"],
        Value::Null,
        "nothing of a refused request is stored: {reply}"
    );
    assert!(accepted > 0);

    eventually(
        "every event taken to be delivered",
        Duration::from_secs(60),
        || async { (receiver.counts().0 as i64 >= accepted).then_some(()) },
    )
    .await;
    eventually(
        "the deliverer to be idle",
        Duration::from_secs(60),
        || async { deliverer_idle(&nats).await.then_some(()) },
    )
    .await;
    let (delivered, requests) = receiver.counts();
    let held = subjects(&nats).await.values().sum::<usize>();
    eprintln!(
        "stream of {MAX_MESSAGES} messages: {accepted} events taken before the refusal, {delivered} delivered ({requests} requests), {held} messages held"
    );
    assert_eq!(
        delivered as i64, accepted,
        "every event taken is delivered once"
    );
    assert!(held as i64 <= MAX_MESSAGES);
    // Still refused while full.
    let (status, retry_after, reply) = post_with_retry_after(op.op.listen_addr, &ns, EVENT).await;
    assert_full_refusal(status, retry_after.as_deref(), &reply);
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_refusals_of_a_full_stream_are_recognised() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    let full_by = |name: &str, max_messages: i64, max_bytes: i64| jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.>")],
        max_messages,
        max_bytes,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    for (stream, config) in [
        ("COUNT", full_by("COUNT", 2, -1)),
        ("SIZE", full_by("SIZE", -1, 300)),
    ] {
        js.create_stream(config).await.unwrap();
        let mut refusal = None;
        for _ in 0..10 {
            let publish = js
                .publish(format!("{stream}.x"), vec![b'x'; 100].into())
                .await
                .unwrap()
                .await;
            if let Err(e) = publish {
                refusal = Some(e);
                break;
            }
        }
        let refusal = refusal.expect("the stream refuses once full");
        eprintln!("{stream}: nats-server answers {refusal}");
        assert!(
            hookrelay::delivery::jetstream::is_full(&refusal),
            "{stream}: {refusal}"
        );
    }
    // Other refusals are not "full".
    let other = js
        .publish("NOWHERE.x", "x".into())
        .await
        .unwrap()
        .await
        .expect_err("no stream");
    assert!(!hookrelay::delivery::jetstream::is_full(&other), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_keeps_the_limits_its_operator_set() {
    let cp = control_plane();
    let ns = cp.namespace("js-kept").await;
    let nats = NatsServer::start().await;
    {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        jetstream::new(client)
            .create_stream(jetstream::stream::Config {
                name: "HOOKRELAY".into(),
                subjects: vec!["hookrelay.>".into()],
                max_bytes: 50 << 20,
                max_messages: 12_345,
                max_age: Duration::from_secs(7200),
                duplicate_window: Duration::from_secs(300),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let before = stream_config(&nats).await;
    assert!(!before.allow_message_schedules);

    // The flags' defaults differ from every limit set above.
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let after = stream_config(&nats).await;
    assert_eq!(after.max_bytes, 50 << 20);
    assert_eq!(after.max_messages, 12_345);
    assert_eq!(after.max_age, Duration::from_secs(7200));
    assert_eq!(after.duplicate_window, Duration::from_secs(300));
    // What hookrelay needs to work was added, nothing else changed.
    assert!(after.allow_message_schedules, "parked retries need it");
    // (nats-server itself allows roll-ups with schedules, and keeps its own metadata.)
    assert_eq!(
        after,
        jetstream::stream::Config {
            allow_message_schedules: true,
            allow_rollup: true,
            metadata: after.metadata.clone(),
            ..before.clone()
        }
    );

    // And it works with it.
    delivers_one_event(cp, &ns, op.op.listen_addr).await;
    op.stop().await;

    // A second start finds nothing to change.
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    assert_eq!(stream_config(&nats).await, after);
    op.stop().await;
}

/// An installation whose `--nats-stream` is not the default, upgraded from when every subject
/// was under `hookrelay.` whatever the stream: at start the stream gains the subjects under its
/// own name lowercased (the old ones stay, for whoever runs NATS to remove once drained) and
/// the durable consumers move to them; new events are stored and delivered there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_named_otherwise_moves_to_subjects_under_its_own_name() {
    let cp = control_plane();
    let ns = cp.namespace("js-renamed").await;
    let nats = NatsServer::start().await;
    let js = jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    // As the previous version left it.
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["hookrelay.>".into()],
            allow_message_schedules: true,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
    for (name, filter) in [
        ("router", "hookrelay.events.>"),
        ("deliverer", "hookrelay.deliveries.>"),
        ("serial", "hookrelay.serial.>"),
        ("recorder", "hookrelay.attempts.>"),
    ] {
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(name.into()),
                filter_subject: filter.into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let mut args = ingest_args(&[&ns], IngestMode::JetStream, Some(&nats));
    args.nats_stream = "ORDERS".into();
    let op = InProcess::start_with(cp.config().await, args).await;
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, ["hookrelay.>", "orders.>"]);
    for (name, filter) in [
        ("router", "orders.events.>"),
        ("deliverer", "orders.deliveries.>"),
        ("serial", "orders.serial.>"),
        ("recorder", "orders.attempts.>"),
    ] {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!(info.config.filter_subject, filter, "{name}");
    }
    delivers_one_event(cp, &ns, op.op.listen_addr).await;
    let stored: std::collections::HashMap<String, usize> = stream
        .info_with_subjects(">")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        stored.get(&format!("orders.deliveries.{ns}.w")),
        Some(&1),
        "{stored:?}"
    );
    assert!(
        stored.keys().all(|s| s.starts_with("orders.")),
        "{stored:?}"
    );
    op.stop().await;
}

/// An event that fits the NATS server's max_payload as an event but would not as a work item
/// (more headers) could never be routed, and would hold the router back for good: ingest
/// refuses it with 413 and stores nothing, while an event of a normal size goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_work_item_is_refused_at_ingest() {
    let cp = control_plane();
    let ns = cp.namespace("js-too-large").await;
    let client = cp.client().await;
    let nats = NatsServer::start().await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    // nats-server's default max_payload is 1 MiB, as is the API's largest body.
    let max_payload = 1024 * 1024;
    let big = "x".repeat(max_payload - 600);
    let body = json!([{"event": "document.completed", "data": {"blob": big}}]).to_string();
    assert!(
        body.len() < max_payload,
        "the request itself is within the body limit"
    );
    let (status, reply) = post_events(op.op.listen_addr, &ns, None, &body).await;
    assert_eq!(status, 413, "{reply}");
    assert_eq!(reply["error"]["code"], "event_too_large", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_payload"), "{message}");
    let stored = subjects(&nats).await;
    assert!(
        !stored.keys().any(|s| s.starts_with("hookrelay.events.")),
        "nothing of the request was stored: {stored:?}"
    );
    let (status, reply) = post_events(op.op.listen_addr, &ns, None, EVENT).await;
    assert_eq!(status, 202, "{reply}");
    eventually(
        "the normal event delivered",
        Duration::from_secs(60),
        || async { (receiver.counts().0 == 1).then_some(()) },
    )
    .await;
    op.stop().await;
}

/// The deliverer consumer's messages handed out and not acked, all replicas together, and those
/// not handed out yet.
async fn deliverer_pending(nats: &NatsServer) -> (usize, u64) {
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("HOOKRELAY").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("deliverer").await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// Two replicas share the deliverer consumer; namespace A's Webhook accepts connections and
/// never answers, and A has ten times `--nats-max-ack-pending` deliveries. Namespace B's event
/// still goes out within seconds: what one namespace keeps in hand, all replicas together,
/// leaves room in the consumer for the others. (Lowered `--nats-max-ack-pending` and
/// `--max-in-flight-per-namespace` make the flood cheap; the shares scale with them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_namespace_on_two_replicas_does_not_stop_another_namespaces_events() {
    let cp = control_plane();
    let ns_a = cp.namespace("js-fair-dead").await;
    let ns_b = cp.namespace("js-fair-live").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let blackhole = crate::support::Blackhole::start().await;
    // The Lease in the first namespace, A's.
    let args = OperatorArgs::new(&format!("{ns_a},{ns_b}"))
        .mode("jetstream")
        .nats(&nats.url)
        .arg("--nats-max-ack-pending", "200")
        .arg("--max-in-flight-per-namespace", "8")
        .leader_elect()
        .fast_lease();
    let (a, b) = (args.start(cp), args.start(cp));
    a.wait_ready().await;
    b.wait_ready().await;
    create_webhook(
        &client,
        &ns_a,
        "dead",
        &format!("http://{}/h", blackhole.addr),
        SECRET,
        json!({"timeoutSeconds": 5}),
    )
    .await;
    let live = counting_webhook(&client, &ns_b, "live", SECRET).await;

    // Ten times max_ack_pending, posted through both replicas.
    const DEAD_EVENTS: usize = 2_000;
    for chunk in 0..DEAD_EVENTS / 100 {
        let batch = format!("[{}]", vec![EVENT; 100].join(","));
        let target = [a.listen_addr, b.listen_addr][chunk % 2];
        let (status, reply) = post_events(target, &ns_a, None, &batch).await;
        assert_eq!(status, 202, "{reply}");
    }
    // Both replicas are sending to the blackhole, and every event of A is routed.
    eventually(
        "both replicas stuck on the blackhole, every event routed",
        Duration::from_secs(60),
        || async {
            let routed = subjects(&nats)
                .await
                .iter()
                .filter(|(s, _)| s.starts_with("hookrelay.deliveries."))
                .map(|(_, n)| *n)
                .sum::<usize>()
                >= DEAD_EVENTS;
            let connections = blackhole
                .connections
                .load(std::sync::atomic::Ordering::Relaxed);
            (routed && connections >= 16).then_some(())
        },
    )
    .await;
    let (in_hand, not_handed_out) = deliverer_pending(&nats).await;

    let started = std::time::Instant::now();
    let (status, reply) = post_events(a.listen_addr, &ns_b, None, &format!("[{EVENT}]")).await;
    assert_eq!(status, 202, "{reply}");
    // Watched for up to two minutes, so that the figure is printed however long it takes.
    let watch_for = Duration::from_secs(120);
    while live.counts().0 == 0 && started.elapsed() < watch_for {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let delivered = live.counts().0 == 1;
    println!(
        "FIGURES a_dead_namespace_on_two_replicas_does_not_stop_another_namespaces_events: \
         B's event {} {took:.1} s after it was posted, behind {DEAD_EVENTS} events of A \
         (deliverer consumer when posted: {in_hand} in hand of max_ack_pending 200, \
         {not_handed_out} not handed out)",
        if delivered {
            "delivered"
        } else {
            "still not delivered"
        }
    );
    assert!(
        took <= 10.0,
        "namespace B's event took {took:.1} s behind namespace A's dead endpoint"
    );
}

/// `hookrelay_jetstream_parked_total{reason="busy"}` of an operator.
async fn parked_busy(metrics: std::net::SocketAddr) -> f64 {
    metric_with(
        metrics,
        "hookrelay_jetstream_parked_total",
        &[("reason", "busy")],
    )
    .await
    .unwrap_or(0.0)
}

/// More deliveries than a namespace has slots wait in hand for them while the namespace's
/// attempts keep up (everything it has in hand turns over within the wait), rather than being
/// parked in the stream and coming back a second or more later; a namespace whose endpoint is
/// too slow to turn them over is parked, keeping its share of the consumer small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_for_slots_that_turn_over_stay_in_hand_and_slow_ones_are_parked() {
    let cp = control_plane();
    let flowing = cp.namespace("js-turnover").await;
    let slow = cp.namespace("js-turnover-slow").await;
    let nats = NatsServer::start().await;
    let client = cp.client().await;
    let op = OperatorArgs::new(&format!("{flowing},{slow}"))
        .mode("jetstream")
        .nats(&nats.url)
        .arg("--max-in-flight-per-namespace", "4")
        .start(cp);
    op.wait_ready().await;

    // 4 slots, 100 ms an answer: 40 attempts a second; 60 deliveries take about 1.5 s, so
    // most wait longer than a second for their slots.
    let (receiver, addr) = CountingReceiver::start_slow(Duration::from_millis(100)).await;
    for i in 0..4 {
        let url = format!("http://{addr}/w{i}");
        create_webhook(&client, &flowing, &format!("w{i}"), &url, SECRET, json!({})).await;
    }
    let batch = format!("[{}]", [EVENT; 15].join(","));
    let (status, reply) = post_events(op.listen_addr, &flowing, None, &batch).await;
    assert_eq!(status, 202, "{reply}");
    eventually("60 deliveries", Duration::from_secs(60), || async {
        (receiver.counts().0 == 60).then_some(())
    })
    .await;
    assert_eq!(receiver.counts(), (60, 60), "each delivered once");
    assert_eq!(
        parked_busy(op.metrics_addr).await,
        0.0,
        "deliveries whose slots turn over were parked"
    );

    // 4 slots, 1.5 s an answer: under 3 attempts a second against 12 in hand.
    let (slow_receiver, slow_addr) =
        CountingReceiver::start_slow(Duration::from_millis(1_500)).await;
    let url = format!("http://{slow_addr}/slow");
    create_webhook(&client, &slow, "slow", &url, SECRET, json!({})).await;
    let batch = format!("[{}]", [EVENT; 12].join(","));
    let (status, reply) = post_events(op.listen_addr, &slow, None, &batch).await;
    assert_eq!(status, 202, "{reply}");
    eventually(
        "the slow namespace's deliveries parked",
        Duration::from_secs(30),
        || async { (parked_busy(op.metrics_addr).await > 0.0).then_some(()) },
    )
    .await;
    eventually("12 slow deliveries", Duration::from_secs(120), || async {
        (slow_receiver.counts().0 == 12).then_some(())
    })
    .await;
    assert_eq!(slow_receiver.counts(), (12, 12), "each delivered once");
}

/// One event routed to more Webhooks than the NATS client waits for publish acks of at once by
/// default (5,000) is stored whole, and the stream still takes events after it: the router
/// awaits its work items' acks in rounds instead of holding them all while it publishes more,
/// which stopped every publish of the process for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_to_more_webhooks_than_the_clients_default_ack_limit_is_routed_whole() {
    use hookrelay::{
        delivery::jetstream as bus,
        routing::{Route, Routes},
        wire::EventBody,
    };
    const WEBHOOKS: usize = 6_000;
    let nats = NatsServer::start().await;
    let config = bus::BusConfig {
        url: nats.url.clone(),
        creds: None,
        tls: Default::default(),
        stream: "HOOKRELAY".into(),
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 30,
        max_messages: 1_000_000,
        max_ack_pending: 10_000,
        max_bytes_per_namespace: 0,
    };
    let connected = bus::connect(&config).await.unwrap();
    let routes = Routes::default();
    routes.update(|table| {
        for i in 0..WEBHOOKS {
            let name = format!("w{i}");
            table.apply(Route::for_tests(
                "wide",
                &name,
                &format!("http://127.0.0.1:9/{name}"),
            ));
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let router = tokio::spawn(bus::route_events(
        connected.clone(),
        routes,
        hookrelay::metrics::Metrics::default(),
        async {},
        stop.clone(),
    ));
    let publish = |id: &str| {
        let body = EventBody::new(
            hookrelay::crd::EventType::Completed,
            "2023-06-15T10:35:00Z",
            &Default::default(),
        );
        let message = bus::EventMessage::new(&connected.subjects, "wide", id, id, &body, None);
        let context = connected.context.clone();
        async move {
            let ack = context
                .publish_with_headers(message.subject, message.headers, message.body)
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(30), ack).await
        }
    };
    assert!(matches!(publish("first").await, Ok(Ok(_))));
    let work_items = || async {
        subjects(&nats)
            .await
            .iter()
            .filter(|(s, _)| s.starts_with("hookrelay.deliveries.wide."))
            .map(|(_, n)| *n)
            .sum::<usize>()
    };
    eventually(
        "every work item of the event stored",
        Duration::from_secs(120),
        || async { (work_items().await == WEBHOOKS).then_some(()) },
    )
    .await;
    // The process still publishes: a second event is stored and routed as well.
    assert!(
        matches!(publish("second").await, Ok(Ok(_))),
        "the stream stopped taking events after a wide fan-out"
    );
    eventually(
        "the second event's work items",
        Duration::from_secs(120),
        || async { (work_items().await == 2 * WEBHOOKS).then_some(()) },
    )
    .await;
    stop.cancel();
    router.await.unwrap().unwrap();
}
