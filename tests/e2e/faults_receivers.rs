//! Receiver faults: a receiver down for a minute, one that never answers, one that
//! trickles its answer, one answering 10 MB, one sending endless headers; and the JetStream
//! server restarted mid-stream. Receivers that must misbehave below HTTP are raw TCP listeners
//! on 127.0.0.1. Each test prints one `FIGURES` line (stderr) for RELIABILITY.md.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hookrelay::{
    crd::{DeliveryRecord, Outcome, Webhook},
    http::IngestMode,
};
use kube::Api;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::support::{
    CountingReceiver, InProcess, ModeOperator, NatsServer, Operator, OperatorArgs, control_plane,
    create_webhook, eventually, free_port, metric_with, rss_mib,
};

const SECRET: &str = "a-signing-secret-for-receiver-faults";
const ATTEMPTS: &str = "hookrelay_delivery_attempts_total";
const RETRYING_NO_ANSWER: &[(&str, &str)] = &[("outcome", "Retrying"), ("status_class", "none")];
const SUCCEEDED: &[(&str, &str)] = &[("outcome", "Succeeded"), ("status_class", "2xx")];
const FAILED_NO_ANSWER: &[(&str, &str)] = &[("outcome", "Failed"), ("status_class", "none")];

/// Events of the contract's shape, each with its own idempotency `id` (a re-sent batch is then
/// deduplicated, and its deliveries keep their ids).
fn events(prefix: &str, range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| {
            json!({"id": format!("{prefix}-{i}"), "event": "document.completed",
                   "timestamp": "2023-06-15T10:35:00Z", "data": {"document_id": i}})
        })
        .collect()
}

async fn webhook_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Option<hookrelay::crd::WebhookStatus> {
    Api::<Webhook>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?
        .status
}

/// Reads one request (head and `content-length` body); false when the peer closed first.
async fn read_request(socket: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf.len() - head_end;
    while body < length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => body += n,
        }
    }
    true
}

/// A raw receiver: `serve` runs on each accepted connection; counts connections accepted and
/// those still open (the operator has not closed them: its attempt is in flight).
#[derive(Clone)]
struct RawReceiver {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl RawReceiver {
    async fn start<F, Fut>(serve: F) -> RawReceiver
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = RawReceiver {
            addr: listener.local_addr().unwrap(),
            accepted: Default::default(),
            open: Default::default(),
        };
        let (accepted, open) = (receiver.accepted.clone(), receiver.open.clone());
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (open, serve) = (open.clone(), serve.clone());
                tokio::spawn(async move {
                    serve(socket).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        receiver
    }

    fn url(&self) -> String {
        format!("http://{}/h", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Accepts, reads the request, never answers; the connection counts as open until the
/// operator closes it.
async fn never_answer(mut socket: TcpStream) {
    read_request(&mut socket).await;
    let mut sink = [0u8; 1024];
    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Answers one byte a second, for ever (a status line, then a header that never ends), until
/// the operator closes the connection.
async fn trickle(mut socket: TcpStream) {
    if !read_request(&mut socket).await {
        return;
    }
    let answer = b"HTTP/1.1 200 OK\r\nx-trickle: "
        .iter()
        .copied()
        .chain(std::iter::repeat(b'a'));
    let mut closed = [0u8; 64];
    for byte in answer {
        if socket.write_all(&[byte]).await.is_err() {
            return;
        }
        tokio::select! {
            // The operator closing its end ends the answer at once (a read of 0), rather
            // than at the next write.
            _ = socket.read(&mut closed) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Answers 200 at once, then trickles the body a byte a second, until the operator closes the
/// connection.
async fn trickle_body(mut socket: TcpStream) {
    if !read_request(&mut socket).await {
        return;
    }
    if socket
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut closed = [0u8; 64];
    loop {
        if socket.write_all(b"a").await.is_err() {
            return;
        }
        tokio::select! {
            _ = socket.read(&mut closed) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Answers 200 with a 10 MB body, written as fast as the operator reads it.
async fn ten_megabytes(mut socket: TcpStream) {
    const SIZE: usize = 10 * 1024 * 1024;
    if !read_request(&mut socket).await {
        return;
    }
    let head =
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {SIZE}\r\n\r\n");
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let block = vec![b'x'; 64 * 1024];
    for _ in 0..SIZE / block.len() {
        if socket.write_all(&block).await.is_err() {
            return;
        }
    }
}

/// Answers a status line, then headers for ever, until the operator gives up.
async fn endless_headers(mut socket: TcpStream) {
    if !read_request(&mut socket).await {
        return;
    }
    if socket.write_all(b"HTTP/1.1 200 OK\r\n").await.is_err() {
        return;
    }
    let mut n = 0u64;
    loop {
        n += 1;
        let line = format!("x-filler-{n}: {}\r\n", "h".repeat(100));
        if socket.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One mode's run of the receiver outage: (sent, distinct delivered, requests, recover_s).
async fn receiver_down_then_back(mode: IngestMode) -> (usize, usize, usize, f64) {
    const EVENTS: usize = 10;
    const OUTAGE: Duration = Duration::from_secs(60);
    let cp = control_plane();
    let ns = cp.namespace("rx-down").await;
    let client = cp.client().await;
    let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
    let metrics = op.op.op.metrics_addr;
    // Nothing listens on the port yet: every attempt is refused until the receiver comes back.
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let down_since = Instant::now();
    // Retries wait 2, 4, then 8 s (the cap): 20 attempts span at least 2+4+17*8 = 142 s, well
    // over the 60 s outage, so no delivery may fail for good.
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"maxAttempts": 20, "initialBackoffSeconds": 2, "maxBackoffSeconds": 8, "timeoutSeconds": 5}),
    )
    .await;
    op.post_events(&ns, &events("down", 0..EVENTS)).await;

    // During the outage the status shows the failures and the retries scheduled.
    let during = eventually(
        &format!("{mode:?}: every delivery failed at least once and is retrying"),
        Duration::from_secs(60),
        || async {
            let status = webhook_status(&client, &ns, "w").await?;
            let retrying = !status.recent_deliveries.is_empty()
                && status
                    .recent_deliveries
                    .iter()
                    .all(|r| r.outcome == Outcome::Retrying);
            (retrying && status.delivery_stats.consecutive_failures >= EVENTS as i64)
                .then_some(status)
        },
    )
    .await;
    assert!(during.delivery_stats.consecutive_failures >= EVENTS as i64);
    assert!(during.delivery_stats.failing_since.is_some());
    assert_eq!(
        during.delivery_stats.failed, 0,
        "{:?}",
        during.delivery_stats
    );
    for r in &during.recent_deliveries {
        assert!(
            r.error.as_deref().unwrap_or_default().contains("connect"),
            "{mode:?}: a refused connection is recorded as such: {r:?}"
        );
    }

    // The fault itself lasts 60 s: this wait is the outage, not a synchronisation.
    tokio::time::sleep(OUTAGE.saturating_sub(down_since.elapsed())).await;
    let receiver = CountingReceiver::start_on(addr).await;
    let back_at = Instant::now();
    let recovered = eventually(
        &format!("{mode:?}: every event delivered once the receiver is back"),
        Duration::from_secs(120),
        || async { (receiver.counts().0 == EVENTS).then(Instant::now) },
    )
    .await;
    let recover_s = recovered.duration_since(back_at).as_secs_f64();

    // Status: every delivery succeeded after retries, none failed for good.
    let after = eventually(
        &format!("{mode:?}: the status counts every success"),
        Duration::from_secs(60),
        || async {
            let status = webhook_status(&client, &ns, "w").await?;
            (status.delivery_stats.succeeded >= EVENTS as i64).then_some(status)
        },
    )
    .await;
    assert_eq!(
        after.delivery_stats.failed, 0,
        "{mode:?}: {:?}",
        after.delivery_stats
    );
    assert_eq!(after.delivery_stats.consecutive_failures, 0);
    let successes: Vec<&DeliveryRecord> = after
        .recent_deliveries
        .iter()
        .filter(|r| r.outcome == Outcome::Succeeded)
        .collect();
    assert!(!successes.is_empty());
    for r in &successes {
        assert!(
            (2..=20).contains(&r.attempt),
            "{mode:?}: each success came after backoff, within maxAttempts: {r:?}"
        );
    }
    assert!(
        after
            .recent_deliveries
            .iter()
            .all(|r| r.outcome != Outcome::Failed),
        "{mode:?}: {:?}",
        after.recent_deliveries
    );

    // Metrics: the refused attempts counted as retries, the successes, no final failure.
    let retried = metric_with(metrics, ATTEMPTS, RETRYING_NO_ANSWER)
        .await
        .unwrap_or(0.0);
    assert!(
        retried >= EVENTS as f64,
        "{mode:?}: {retried} retries counted"
    );
    let succeeded = eventually(
        &format!("{mode:?}: every success counted"),
        Duration::from_secs(30),
        || async {
            let n = metric_with(metrics, ATTEMPTS, SUCCEEDED).await?;
            (n >= EVENTS as f64).then_some(n)
        },
    )
    .await;
    assert_eq!(
        metric_with(metrics, ATTEMPTS, FAILED_NO_ANSWER)
            .await
            .unwrap_or(0.0),
        0.0,
        "{mode:?}: no delivery failed for good"
    );
    assert!(succeeded >= EVENTS as f64);
    let (distinct, requests) = receiver.counts();
    (EVENTS, distinct, requests, recover_s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_minute_gets_every_event_afterwards_in_every_ingest_mode() {
    // The three modes share the minute of outage rather than taking one each.
    let runs = futures::future::join_all(
        [
            IngestMode::Direct,
            IngestMode::Durable,
            IngestMode::JetStream,
        ]
        .map(receiver_down_then_back),
    )
    .await;
    let sent: usize = runs.iter().map(|r| r.0).sum();
    let delivered: usize = runs.iter().map(|r| r.1).sum();
    let requests: usize = runs.iter().map(|r| r.2).sum();
    let recover = runs.iter().map(|r| r.3).fold(0.0, f64::max);
    eprintln!(
        "FIGURES a_receiver_down_for_a_minute_gets_every_event_afterwards_in_every_ingest_mode: sent={sent} delivered={delivered} duplicates={} lost={} recover_s={recover:.1} outage_s=60 recover_s_direct={:.1} recover_s_durable={:.1} recover_s_jetstream={:.1} backoff=2..8s max_attempts=20",
        requests - delivered,
        sent - delivered,
        runs[0].3,
        runs[1].3,
        runs[2].3,
    );
    assert_eq!(delivered, sent, "no event lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_that_hang_or_trickle_time_out_and_do_not_hold_up_other_webhooks() {
    const EVENTS: usize = 10;
    const TIMEOUT_S: i64 = 20;
    let cp = control_plane();
    let ns = cp.namespace("rx-hang").await;
    let client = cp.client().await;
    let op = ModeOperator::start(cp, IngestMode::Durable, &[&ns], |_| {}).await;
    let metrics = op.op.op.metrics_addr;
    let hanging = RawReceiver::start(never_answer).await;
    let trickling = RawReceiver::start(trickle).await;
    let trickling_body = RawReceiver::start(trickle_body).await;
    let (good, good_addr) = CountingReceiver::start().await;
    let slow = json!({"timeoutSeconds": TIMEOUT_S, "maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1});
    create_webhook(
        &client,
        &ns,
        "hanging",
        &hanging.url(),
        SECRET,
        slow.clone(),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "trickling",
        &trickling.url(),
        SECRET,
        slow.clone(),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "trickling-body",
        &trickling_body.url(),
        SECRET,
        slow,
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "good",
        &format!("http://{good_addr}/h"),
        SECRET,
        json!({}),
    )
    .await;
    let sent_at = Instant::now();
    op.post_events(&ns, &events("hang", 0..EVENTS)).await;

    // Every event reaches the good Webhook while the other two still hold their attempts:
    // their connections are open (the operator has not given up on them).
    let (held_hanging, held_trickling) = eventually(
        "the good webhook's events delivered while the others' attempts are in flight",
        Duration::from_secs(120),
        || async {
            let (hanging, trickling) = (hanging.open(), trickling.open());
            (good.counts().0 == EVENTS && hanging > 0 && trickling > 0 && trickling_body.open() > 0)
                .then_some((hanging, trickling))
        },
    )
    .await;
    let good_delivered_s = sent_at.elapsed().as_secs_f64();

    // The timeout holds: attempts end as timeouts, Retrying, and are made again.
    for (name, receiver) in [("hanging", &hanging), ("trickling", &trickling)] {
        let timed_out = eventually(
            &format!("{name}: attempts recorded as timeouts and retried"),
            Duration::from_secs(120),
            || async {
                let status = webhook_status(&client, &ns, name).await?;
                let timeouts: Vec<DeliveryRecord> = status
                    .recent_deliveries
                    .into_iter()
                    .filter(|r| {
                        r.outcome == Outcome::Retrying
                            && r.error.as_deref() == Some(&format!("timed out after {TIMEOUT_S}s"))
                    })
                    .collect();
                (!timeouts.is_empty() && receiver.accepted() > EVENTS).then_some(timeouts)
            },
        )
        .await;
        for r in &timed_out {
            assert_eq!(r.attempt, 1, "{r:?}");
            assert!(r.http_status.is_none(), "{r:?}");
            // The attempt lasted the timeout: no longer than it (and scheduling slack).
            assert!(
                r.duration_ms >= TIMEOUT_S * 1000 - 100 && r.duration_ms <= (TIMEOUT_S + 30) * 1000,
                "{name}: an attempt lasted {} ms with a {TIMEOUT_S}s timeout",
                r.duration_ms
            );
        }
    }
    // A 200 whose body trickles: the answer counts (the receiver said 200), and reading the
    // body ends with the attempt's timeout rather than after the 64 KiB read at most.
    let trickled = eventually(
        "trickling-body: every delivery ended",
        Duration::from_secs(150),
        || async {
            let status = webhook_status(&client, &ns, "trickling-body").await?;
            (status.delivery_stats.succeeded == EVENTS as i64).then_some(status)
        },
    )
    .await;
    for r in &trickled.recent_deliveries {
        assert_eq!(
            (r.outcome, r.http_status),
            (Outcome::Succeeded, Some(200)),
            "{r:?}"
        );
        assert!(
            r.duration_ms >= TIMEOUT_S * 1000 - 100 && r.duration_ms <= (TIMEOUT_S + 30) * 1000,
            "trickling-body: an attempt lasted {} ms with a {TIMEOUT_S}s timeout",
            r.duration_ms
        );
    }
    eventually(
        "trickling-body: every connection closed by the operator",
        Duration::from_secs(60),
        || async { (trickling_body.open() == 0).then_some(()) },
    )
    .await;
    let timeouts = metric_with(metrics, ATTEMPTS, RETRYING_NO_ANSWER)
        .await
        .unwrap_or(0.0);
    assert!(timeouts >= 2.0, "{timeouts} timed-out attempts counted");
    let (delivered, requests) = good.counts();
    eprintln!(
        "FIGURES receivers_that_hang_or_trickle_time_out_and_do_not_hold_up_other_webhooks: sent={EVENTS} delivered={delivered} duplicates={} lost={} recover_s=- held_hanging={held_hanging} held_trickling={held_trickling} trickled_body_attempt_ms={} good_delivered_s={good_delivered_s:.1} timeout_s={TIMEOUT_S} timed_out_attempts={timeouts}",
        requests - delivered,
        EVENTS - delivered,
        trickled
            .recent_deliveries
            .iter()
            .map(|r| r.duration_ms)
            .max()
            .unwrap_or(0),
    );
    assert_eq!(delivered, EVENTS);
}

async fn post_huge(op: &Operator, ns: &str, range: std::ops::Range<usize>) {
    let body = Value::Array(events("huge", range)).to_string();
    let (status, reply) = crate::support::api_call(
        op.listen_addr,
        "POST",
        &format!("/api/events?namespace={ns}"),
        None,
        Some(&body),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
}

/// Waits until `n` answers of each receiver were handled: the huge ones succeed, the endless
/// heads fail (one attempt each).
async fn answered(op: &Operator, n: usize) {
    let addr = op.metrics_addr;
    eventually(
        &format!(
            "{n} answers of each receiver handled (log: {})",
            op.log.display()
        ),
        Duration::from_secs(150),
        || async move {
            let ok = metric_with(addr, ATTEMPTS, SUCCEEDED).await.unwrap_or(0.0);
            let failed = metric_with(addr, ATTEMPTS, FAILED_NO_ANSWER)
                .await
                .unwrap_or(0.0);
            (ok >= n as f64 && failed >= n as f64).then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_and_endless_headers_are_read_capped_and_memory_stays_flat() {
    const WARM_UP: usize = 10;
    const EVENTS: usize = 100;
    /// RSS growth allowed over 200 such answers. Reading the bodies whole would take 10 MiB
    /// each, 80 MiB for the 8 attempts a Webhook has in flight.
    const GROWTH_BOUND_MIB: f64 = 32.0;
    let cp = control_plane();
    let ns = cp.namespace("rx-huge").await;
    let client = cp.client().await;
    let op = OperatorArgs::new(&ns).start(cp);
    op.wait_ready().await;
    let pid = op.child.id().expect("the operator runs");
    let huge = RawReceiver::start(ten_megabytes).await;
    let headers = RawReceiver::start(endless_headers).await;
    let once = json!({"maxAttempts": 1, "timeoutSeconds": 30});
    create_webhook(&client, &ns, "huge", &huge.url(), SECRET, once.clone()).await;
    create_webhook(&client, &ns, "headers", &headers.url(), SECRET, once).await;

    // A warm-up first: pools, caches and the allocator's arenas are then in place.
    post_huge(&op, &ns, 0..WARM_UP).await;
    answered(&op, WARM_UP).await;
    let rss_before = rss_mib(pid);
    for chunk in (WARM_UP..WARM_UP + EVENTS).step_by(20) {
        post_huge(&op, &ns, chunk..chunk + 20).await;
    }
    answered(&op, WARM_UP + EVENTS).await;
    let rss_after = rss_mib(pid);

    // What the receivers answered is not kept: a 200 for the huge body, a bounded error for
    // the endless head.
    let huge_status = webhook_status(&client, &ns, "huge").await.unwrap();
    assert!(
        huge_status
            .recent_deliveries
            .iter()
            .all(|r| r.outcome == Outcome::Succeeded
                && r.http_status == Some(200)
                && r.error.is_none())
    );
    let headers_status = webhook_status(&client, &ns, "headers").await.unwrap();
    assert!(!headers_status.recent_deliveries.is_empty());
    for r in &headers_status.recent_deliveries {
        let error = r.error.as_deref().unwrap_or_default();
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert!(r.http_status.is_none(), "{r:?}");
        assert!(
            !error.is_empty() && error.chars().count() <= hookrelay::status::MAX_ERROR_CHARS + 1,
            "{r:?}"
        );
    }
    let growth = rss_after - rss_before;
    eprintln!(
        "FIGURES huge_bodies_and_endless_headers_are_read_capped_and_memory_stays_flat: sent={} delivered=- duplicates=- lost=- recover_s=- answers={} rss_before_mib={rss_before:.1} rss_after_mib={rss_after:.1} growth_mib={growth:.1} bound_mib={GROWTH_BOUND_MIB} body_mb=10 build=debug headers_error={:?}",
        WARM_UP + EVENTS,
        2 * (WARM_UP + EVENTS),
        headers_status.recent_deliveries[0]
            .error
            .as_deref()
            .unwrap_or_default(),
    );
    assert!(
        growth < GROWTH_BOUND_MIB,
        "the operator's RSS grew by {growth:.1} MiB ({rss_before:.1} -> {rss_after:.1}) over {} huge answers",
        2 * EVENTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_server_restarted_mid_stream_loses_no_accepted_event() {
    const BATCHES: usize = 30;
    const PER_BATCH: usize = 10;
    const EVENTS: usize = BATCHES * PER_BATCH;
    const NATS_DOWN: Duration = Duration::from_secs(5);
    let cp = control_plane();
    let ns = cp.namespace("rx-nats").await;
    let client = cp.client().await;
    let mut nats = NatsServer::start().await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::JetStream, Some(&nats)).await;
    let listen = op.op.listen_addr;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"initialBackoffSeconds": 1, "maxBackoffSeconds": 2}),
    )
    .await;

    // The stream: batches sent one after another, each sent again until accepted (as a client
    // must when the answer is an error), safe to repeat thanks to the events' ids.
    let accepted_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (ns, accepted_at, refused) = (ns.clone(), accepted_at.clone(), refused.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            for b in 0..BATCHES {
                let body =
                    Value::Array(events("js", b * PER_BATCH..(b + 1) * PER_BATCH)).to_string();
                loop {
                    let answer = http
                        .post(format!("http://{listen}/api/events?namespace={ns}"))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    if matches!(&answer, Ok(r) if r.status().as_u16() == 202) {
                        accepted_at.lock().unwrap().push(Instant::now());
                        break;
                    }
                    refused.fetch_add(1, Ordering::SeqCst);
                    // A client's pause before it sends again, not a synchronisation.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The pace of the stream.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    eventually(
        "a fifth of the stream delivered",
        Duration::from_secs(120),
        || async { (receiver.counts().0 >= EVENTS / 5).then_some(()) },
    )
    .await;
    let delivered_before = receiver.counts().0;
    let killed_at = Instant::now();
    nats.restart(NATS_DOWN).await;
    let back_s = killed_at.elapsed().as_secs_f64();
    sender.await.unwrap();
    let accepted_again = accepted_at
        .lock()
        .unwrap()
        .iter()
        .copied()
        .find(|t| *t > killed_at);
    eventually(
        "every accepted event delivered after the restart",
        Duration::from_secs(150),
        || async { (receiver.counts().0 == EVENTS).then_some(()) },
    )
    .await;
    let all_delivered_s = killed_at.elapsed().as_secs_f64();
    let recover_s = accepted_again
        .map(|t| format!("{:.1}", t.duration_since(killed_at).as_secs_f64()))
        .unwrap_or_else(|| "-".into());
    let (delivered, requests) = receiver.counts();
    eprintln!(
        "FIGURES a_jetstream_server_restarted_mid_stream_loses_no_accepted_event: sent={EVENTS} delivered={delivered} duplicates={} lost={} recover_s={recover_s} delivered_before_restart={delivered_before} nats_down_s={} nats_back_s={back_s:.1} all_delivered_s={all_delivered_s:.1} refused_posts={}",
        requests - delivered,
        EVENTS - delivered,
        NATS_DOWN.as_secs(),
        refused.load(Ordering::SeqCst),
    );
    assert_eq!(delivered, EVENTS, "at least once: no accepted event lost");
    assert!(
        requests <= 2 * EVENTS,
        "duplicates stay bounded: {requests} requests for {EVENTS} events"
    );
    drop(op);
}
