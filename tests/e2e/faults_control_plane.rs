//! Control-plane faults: the kube-apiserver restarted, etcd restarted, and the
//! kube-apiserver unreachable (SIGSTOP) for 30 s, each in the middle of a stream of events.
//!
//! Each test has a control plane of its own ([`OwnControlPlane`]), so that the shared one of the
//! other tests is never touched, and they run one at a time ([`OWN_CONTROL_PLANES`]): two
//! control planes restarting at once on two cores would measure the machine, not the operator. The operator is
//! the real binary ([`Operator`]), debug build.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hookrelay::crd::{DocumentEvent, EventPhase, Webhook};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::support::{
    CountingReceiver, OWN_CONTROL_PLANES, Operator, OperatorArgs, OwnControlPlane, api_call,
    create_webhook, eventually, metric_sum, readyz, rss_mib,
};

/// DocumentEvents of the stream, created one every [`PACE`]: about 30 s of traffic, with the
/// fault landing about 5 s in, so that events are created before, during and after it.
const STREAM_EVENTS: usize = 300;
const PACE: Duration = Duration::from_millis(100);
/// Events created after the restart, for the Webhook created after it too.
const AFTER_EVENTS: usize = 20;
/// How long the kube-apiserver or etcd stays down.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// The quiet window after catching up in which status patches and API requests are counted.
const QUIET_WINDOW: Duration = Duration::from_secs(20);
/// Upper bounds over the quiet window, for a storm of patches or requests (relists, retries)
/// after the fault. Nothing is being delivered then: the operator only holds its watches (a
/// watch that times out server-side, every 5-10 minutes, is one request) and cleans nothing up
/// yet (retention is 10 minutes).
const QUIET_MAX_PATCHES: f64 = 5.0;
const QUIET_MAX_REQUESTS: f64 = 30.0;

const SECRET: &str = "signing-secret-0123456789";

/// Creates DocumentEvent `name` the way a careful producer does: retried until the API server
/// has it, through an outage. A create whose answer was lost (the server went down after
/// storing it) is found again as AlreadyExists, so each event is created exactly once.
async fn create_until_stored(events: &Api<DocumentEvent>, name: &str, i: usize) {
    let e: DocumentEvent = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
        "metadata": {"name": name},
        "spec": {"type": "document.completed", "data": {"document_id": i}}
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Bounded per try: with etcd down the API server holds a request for a long time.
        match tokio::time::timeout(
            Duration::from_secs(5),
            events.create(&PostParams::default(), &e),
        )
        .await
        {
            Ok(Ok(_)) => return,
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "DocumentEvent {name} not stored within 120 s"
        );
        // The producer's retry interval, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the stream: `count` DocumentEvents `prefix-NNNN`, one every [`PACE`], each retried
/// until stored. `started` counts the events whose creation has begun.
fn stream(
    client: &Client,
    ns: &str,
    prefix: &'static str,
    count: usize,
    started: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PACE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..count {
            tick.tick().await;
            started.fetch_add(1, Ordering::SeqCst);
            create_until_stored(&events, &format!("{prefix}-{i:04}"), i).await;
        }
    })
}

/// (status patches, API requests) so far, from the operator's /metrics.
async fn patches_and_requests(op: &Operator) -> (f64, f64) {
    let addr = op.metrics_addr;
    eventually(
        "the operator's /metrics",
        Duration::from_secs(30),
        || async move {
            Some((
                metric_sum(addr, "hookrelay_status_patches_total").await?,
                metric_sum(addr, "hookrelay_kube_api_requests_total").await?,
            ))
        },
    )
    .await
}

/// Waits until every DocumentEvent of the namespace (`expected` of them) is Delivered: the
/// status caught up with the deliveries.
async fn wait_all_delivered(client: &Client, ns: &str, expected: usize) {
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("all {expected} DocumentEvents Delivered"),
        Duration::from_secs(120),
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let delivered = list
                .items
                .iter()
                .filter(|e| e.status.as_ref().and_then(|s| s.phase) == Some(EventPhase::Delivered))
                .count();
            (list.items.len() == expected && delivered == expected).then_some(())
        },
    )
    .await
}

/// Counts status patches and API requests over [`QUIET_WINDOW`] once nothing is left to do.
async fn quiet_window(op: &Operator) -> (f64, f64) {
    let before = patches_and_requests(op).await;
    // A measurement window, not a synchronisation: what happens in it is the figure.
    tokio::time::sleep(QUIET_WINDOW).await;
    let after = patches_and_requests(op).await;
    (after.0 - before.0, after.1 - before.1)
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    ApiServer,
    Etcd,
}

/// The kube-apiserver or etcd stopped mid-stream and started again [`DOWN_FOR`] later, with
/// durable ingest: the events are DocumentEvents, so the fault takes both the operator's watch
/// and its status writes away, and the producer's creates too.
async fn restart_mid_stream(test: &str, restart: Restart) {
    let _serial = OWN_CONTROL_PLANES.lock().await;
    let cp = OwnControlPlane::start(test).await;
    let ns = cp.namespace("cpfault").await;
    let client = cp.client().await;
    let op = OperatorArgs::new(&ns).with_auth().start(&cp);
    op.wait_ready().await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "before",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"initialBackoffSeconds": 1}),
    )
    .await;

    let started = Arc::new(AtomicUsize::new(0));
    let producer = stream(&client, &ns, "ev", STREAM_EVENTS, started.clone());
    eventually(
        "50 deliveries before the fault",
        Duration::from_secs(60),
        || async { (receiver.counts().0 >= 50).then_some(()) },
    )
    .await;
    let at_fault_counters = patches_and_requests(&op).await;
    match restart {
        Restart::ApiServer => cp.stop_apiserver().await,
        Restart::Etcd => cp.stop_etcd().await,
    }
    let at_fault = receiver.counts().0;
    // The fault's length (10 s), not a synchronisation.
    tokio::time::sleep(DOWN_FOR).await;
    match restart {
        Restart::ApiServer => cp.start_apiserver().await,
        Restart::Etcd => cp.start_etcd().await,
    }
    let back = Instant::now();
    assert!(
        at_fault < STREAM_EVENTS,
        "the fault must land mid-stream: {at_fault} of {STREAM_EVENTS} were delivered before it"
    );

    // Recovered once every event the producer had begun by the time the server was back (the
    // backlog of the outage, and the one it was retrying) is delivered; the stream goes on.
    let backlog = started.load(Ordering::SeqCst);
    eventually(
        "the outage's backlog delivered after the restart",
        Duration::from_secs(120),
        || async { (receiver.counts().0 >= backlog).then_some(()) },
    )
    .await;
    let recover_s = back.elapsed().as_secs_f64();
    producer.await.expect("every stream event stored");
    eventually(
        "every stream event delivered after the restart",
        Duration::from_secs(120),
        || async { (receiver.counts().0 >= STREAM_EVENTS).then_some(()) },
    )
    .await;
    let caught_up_counters = patches_and_requests(&op).await;

    // The watches resumed: a Webhook created after the restart becomes Ready (create_webhook
    // waits for it) and gets the events created after it.
    let (late_receiver, late_addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "after",
        &format!("http://{late_addr}/h"),
        SECRET,
        json!({"initialBackoffSeconds": 1}),
    )
    .await;
    stream(&client, &ns, "late", AFTER_EVENTS, Arc::default())
        .await
        .expect("every late event stored");
    eventually(
        "the late events delivered to both Webhooks",
        Duration::from_secs(60),
        || async {
            (late_receiver.counts().0 >= AFTER_EVENTS
                && receiver.counts().0 >= STREAM_EVENTS + AFTER_EVENTS)
                .then_some(())
        },
    )
    .await;
    let sent = STREAM_EVENTS + AFTER_EVENTS;
    wait_all_delivered(&client, &ns, sent).await;

    let (quiet_patches, quiet_requests) = quiet_window(&op).await;
    let (distinct, total) = receiver.counts();
    let (late_distinct, late_total) = late_receiver.counts();
    let duplicates = (total - distinct) + (late_total - late_distinct);
    let lost = sent.saturating_sub(distinct) + AFTER_EVENTS.saturating_sub(late_distinct);
    eprintln!(
        "FIGURES {test}: sent={} delivered={} duplicates={duplicates} lost={lost} \
         recover_s={recover_s:.1} down_s={} delivered_before_fault={at_fault} backlog={backlog} \
         status_patches_fault_to_caught_up={} api_requests_fault_to_caught_up={} \
         status_patches_quiet={quiet_patches} api_requests_quiet={quiet_requests} \
         quiet_s={} rss_mib={:.1} build=debug",
        sent + AFTER_EVENTS,
        distinct + late_distinct,
        DOWN_FOR.as_secs(),
        caught_up_counters.0 - at_fault_counters.0,
        caught_up_counters.1 - at_fault_counters.1,
        QUIET_WINDOW.as_secs(),
        op.child.id().map(rss_mib).unwrap_or(f64::NAN),
    );
    assert_eq!(
        (distinct, late_distinct),
        (sent, AFTER_EVENTS),
        "every event delivered once to each of its Webhooks"
    );
    // The controller tracks each DocumentEvent in memory from its first sighting, and a relist
    // after the fault finds them tracked: no attempt is made again. A delivery is repeated
    // only if its answer is lost, which a loopback receiver answering at once does not do.
    assert_eq!(
        duplicates, 0,
        "deliveries repeated after the {restart:?} restart"
    );
    assert!(
        quiet_patches <= QUIET_MAX_PATCHES && quiet_requests <= QUIET_MAX_REQUESTS,
        "a storm after the {restart:?} restart: {quiet_patches} status patches and \
         {quiet_requests} API requests in a quiet {QUIET_WINDOW:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_restart_mid_stream_loses_nothing() {
    restart_mid_stream(
        "kube_apiserver_restart_mid_stream_loses_nothing",
        Restart::ApiServer,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_mid_stream_loses_nothing() {
    restart_mid_stream("etcd_restart_mid_stream_loses_nothing", Restart::Etcd).await
}

/// How long the kube-apiserver is unreachable.
const PAUSED_FOR: Duration = Duration::from_secs(30);
/// Direct-mode requests of [`BATCH`] events posted before, during and after the pause.
const REQUESTS_EACH: usize = 10;
const BATCH: usize = 10;

/// Posts `REQUESTS_EACH` requests of `BATCH` events, one every [`PACE`] x 5; each must be
/// accepted within 20 s (direct ingest needs nothing from the API server).
async fn post_batches(op: &Operator, ns: &str, phase: &str) {
    for r in 0..REQUESTS_EACH {
        let events: Vec<_> = (0..BATCH)
            .map(|i| {
                json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z",
                       "data": {"document_id": format!("{phase}-{r}-{i}")}})
            })
            .collect();
        let body = serde_json::Value::Array(events).to_string();
        let (status, reply) = tokio::time::timeout(
            Duration::from_secs(20),
            api_call(
                op.listen_addr,
                "POST",
                &format!("/api/events?namespace={ns}"),
                None,
                Some(&body),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("POST /api/events ({phase}) hung for 20 s"));
        assert_eq!(
            status, 202,
            "direct ingest refused events ({phase}): {reply}"
        );
        // The producer's pace, not a synchronisation.
        tokio::time::sleep(PACE * 5).await;
    }
}

/// /readyz answers seen while sampling: (200, other status, no answer within 5 s).
#[derive(Default, Debug)]
struct ReadyzSamples {
    ok: usize,
    not_ready: usize,
    no_answer: usize,
}

fn sample_readyz(
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<ReadyzSamples> {
    tokio::spawn(async move {
        let mut samples = ReadyzSamples::default();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while !stop.is_cancelled() {
            tick.tick().await;
            match readyz(addr).await {
                Some(200) => samples.ok += 1,
                Some(_) => samples.not_ready += 1,
                None => samples.no_answer += 1,
            }
        }
        samples
    })
}

/// The kube-apiserver unreachable for 30 s (SIGSTOP: connections are accepted, nothing
/// answers, as behind a partition) with direct ingest: events posted during the pause are
/// delivered during it, /readyz keeps answering, and after SIGCONT the Webhook's status
/// (counts, recent deliveries) catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_unreachable_for_30s_direct_ingest_keeps_delivering() {
    let test = "kube_apiserver_unreachable_for_30s_direct_ingest_keeps_delivering";
    let _serial = OWN_CONTROL_PLANES.lock().await;
    let cp = OwnControlPlane::start("paused").await;
    let ns = cp.namespace("cpfault").await;
    let client = cp.client().await;
    let mut op = OperatorArgs::new(&ns).mode("direct").start(&cp);
    // And one with durable ingest (its own namespace): it needs the API server to accept.
    let durable_ns = cp.namespace("cpfault-durable").await;
    let durable = OperatorArgs::new(&durable_ns).start(&cp);
    // And a direct one with authentication (its own namespace), whose caller is reviewed by
    // the API server: its cached answers last 10 s (access) and 30 s (token).
    let authed_ns = cp.namespace("cpfault-auth").await;
    let token = cp.service_account_token(&authed_ns, "ingester").await;
    for args in [
        vec!["create", "role", "ingester", "--verb=create"],
        vec!["create", "rolebinding", "ingester", "--role=ingester"],
    ] {
        let subject = format!("--serviceaccount={authed_ns}:ingester");
        let extra = if args[1] == "role" {
            "--resource=documentevents.hookrelay.dev"
        } else {
            subject.as_str()
        };
        cp.kubectl_ok(&[&args[..], &[extra, "-n", &authed_ns]].concat(), None)
            .await;
    }
    let authed = OperatorArgs::new(&authed_ns)
        .with_auth()
        .mode("direct")
        .start(&cp);
    op.wait_ready().await;
    durable.wait_ready().await;
    authed.wait_ready().await;
    let authed_post = {
        let (addr, ns, token) = (authed.listen_addr, authed_ns.clone(), token.clone());
        move || {
            let (ns, token) = (ns.clone(), token.clone());
            async move {
                let body = json!([{"event": "document.completed", "data": {"document_id": 1}}]);
                tokio::time::timeout(
                    Duration::from_secs(60),
                    api_call(
                        addr,
                        "POST",
                        &format!("/api/events?namespace={ns}"),
                        Some(&token),
                        Some(&body.to_string()),
                    ),
                )
                .await
                .expect("authenticated ingest answers while the API server is unreachable")
            }
        }
    };
    // Reviewed and cached now.
    let (status, reply) = authed_post().await;
    assert_eq!(status, 202, "authenticated direct ingest: {reply}");
    let reviewed_at = Instant::now();
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"initialBackoffSeconds": 1}),
    )
    .await;
    let each = REQUESTS_EACH * BATCH;
    post_batches(&op, &ns, "before").await;
    eventually(
        "the events posted before the pause delivered",
        Duration::from_secs(60),
        || async { (receiver.counts().0 >= each).then_some(()) },
    )
    .await;

    let sampling = tokio_util::sync::CancellationToken::new();
    let readyz = sample_readyz(op.metrics_addr, sampling.clone());
    cp.pause_apiserver().await;
    let paused_at = Instant::now();
    // Durable ingest cannot store events now: it must say so (503) before its request limit
    // (30 s) would answer 408 as if the client were slow.
    let durable_post = {
        let (addr, ns) = (durable.listen_addr, durable_ns.clone());
        tokio::spawn(async move {
            let body = json!([{"event": "document.completed", "data": {"document_id": 1}}]);
            tokio::time::timeout(
                Duration::from_secs(60),
                api_call(
                    addr,
                    "POST",
                    &format!("/api/events?namespace={ns}"),
                    None,
                    Some(&body.to_string()),
                ),
            )
            .await
            .expect("durable ingest answers while the API server is unreachable")
        })
    };
    // Once the cached access decision (10 s) has expired, the access review goes to the paused
    // API server: the caller must hear 503 from the review's own limit, not 408 from the
    // request's, which blames the client.
    let authed_during = tokio::spawn(async move {
        tokio::time::sleep_until((reviewed_at + Duration::from_secs(11)).into()).await;
        authed_post().await
    });
    post_batches(&op, &ns, "during").await;
    // Delivered while the API server is still paused: the upper bound leaves the pause room.
    eventually(
        "the events posted during the pause delivered during it",
        PAUSED_FOR.saturating_sub(paused_at.elapsed()),
        || async { (receiver.counts().0 >= 2 * each).then_some(()) },
    )
    .await;
    let delivered_while_paused = receiver.counts().0;
    let (durable_status, durable_reply) = durable_post.await.unwrap();
    let (authed_status, authed_reply) = authed_during.await.unwrap();
    // The rest of the fault's 30 s, not a synchronisation.
    tokio::time::sleep(PAUSED_FOR.saturating_sub(paused_at.elapsed())).await;
    cp.resume_apiserver().await;
    let resumed = Instant::now();
    assert!(
        op.child.try_wait().expect("operator status").is_none(),
        "the operator exited during the pause (log: {})",
        op.log.display()
    );

    post_batches(&op, &ns, "after").await;
    let sent = 3 * each;
    eventually(
        "every event delivered after the pause",
        Duration::from_secs(60),
        || async { (receiver.counts().0 >= sent).then_some(()) },
    )
    .await;
    // The status catches up: every attempt counted, the newest in the recent deliveries.
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    eventually(
        "the Webhook's status counts every delivery",
        Duration::from_secs(120),
        || async {
            let status = webhooks.get("w").await.ok()?.status?;
            (status.delivery_stats.succeeded >= sent as i64 && !status.recent_deliveries.is_empty())
                .then_some(())
        },
    )
    .await;
    let recover_s = resumed.elapsed().as_secs_f64();
    sampling.cancel();
    let readyz = readyz.await.unwrap();

    let (quiet_patches, quiet_requests) = quiet_window(&op).await;
    let (distinct, total) = receiver.counts();
    let duplicates = total - distinct;
    eprintln!(
        "FIGURES {test}: sent={sent} delivered={distinct} duplicates={duplicates} lost={} \
         recover_s={recover_s:.1} paused_s={} delivered_while_paused={} readyz_ok={} \
         readyz_not_ready={} readyz_no_answer={} durable_ingest_during_pause={durable_status} \
         authed_ingest_after_cache_expiry={authed_status} \
         status_patches_quiet={quiet_patches} \
         api_requests_quiet={quiet_requests} quiet_s={} rss_mib={:.1} build=debug",
        sent.saturating_sub(distinct),
        PAUSED_FOR.as_secs(),
        delivered_while_paused - each,
        readyz.ok,
        readyz.not_ready,
        readyz.no_answer,
        QUIET_WINDOW.as_secs(),
        op.child.id().map(rss_mib).unwrap_or(f64::NAN),
    );
    assert_eq!(distinct, sent, "every event delivered");
    assert_eq!(duplicates, 0, "direct ingest delivers each event once");
    // Its store was sent and not answered: the event may have been stored, and says so.
    assert_eq!(
        (durable_status, &durable_reply["error"]["code"]),
        (503, &json!("outcome_unknown")),
        "durable ingest with the API server unreachable: {durable_reply}"
    );
    assert_eq!(
        durable_reply["error"]["unknown"],
        json!([0]),
        "{durable_reply}"
    );
    assert_eq!(
        (authed_status, &authed_reply["error"]["code"]),
        (503, &json!("unavailable")),
        "authenticated ingest needing a review with the API server unreachable: {authed_reply}"
    );
    assert!(
        authed_reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer")),
        "the 503 names the silent API server: {authed_reply}"
    );
    assert_eq!(
        readyz.no_answer, 0,
        "/readyz must keep answering while the API server is unreachable: {readyz:?}"
    );
    assert!(
        quiet_patches <= QUIET_MAX_PATCHES && quiet_requests <= QUIET_MAX_REQUESTS,
        "a storm after the pause: {quiet_patches} status patches and {quiet_requests} API \
         requests in a quiet {QUIET_WINDOW:?}"
    );
}
