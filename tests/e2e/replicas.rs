//! Several replicas that never lose an event, and leadership that steps down instead of
//! exiting.
//!
//! - A JetStream replica cut off from the API server (its connections go through a [`TcpProxy`]
//!   that is cut) while a Webhook is created and events are posted to another replica: no event
//!   is lost, and the cut-off replica says that its view of the routing is stale.
//! - A leader whose API server is stopped for 30 s keeps running (it steps down and comes back)
//!   in every ingest mode, and every event it accepted is delivered.
//! - A leader frozen (SIGSTOP) past its lease and resumed after another replica took over
//!   writes and delivers nothing more.
//!
//! The operators are the real binary ([`Operator`], debug build). Each test prints one
//! `FIGURES` line before its assertions, so that a failing run still reports what happened.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;

use crate::support::{
    ControlPlane, CountingReceiver, NatsServer, OWN_CONTROL_PLANES, Operator, OperatorArgs,
    OwnControlPlane, control_plane, create_webhook, eventually, http_get, metric, metric_sum,
    one_leader, readyz, within,
};

const SECRET: &str = "a-signing-secret-for-replica-tests";

// ---- helpers ----

/// A TCP forwarder on a loopback port: every connection to [`TcpProxy::addr`] is forwarded to
/// the target until [`TcpProxy::cut`], which closes every live connection and makes new ones
/// close at once (a partition seen as resets, not silence); [`TcpProxy::restore`] forwards
/// again. Stopped on drop.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, is_cut) = tokio::sync::watch::channel(false);
        let connections = Arc::new(AtomicU32::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mut is_cut = is_cut.clone();
                if *is_cut.borrow() {
                    // Closed at once: the client sees its connection refused or reset.
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Checks the current value first: a connection made just before a cut
                        // ends too. Also ends when the proxy is dropped.
                        _ = is_cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        TcpProxy {
            addr,
            cut,
            connections,
            task,
        }
    }

    /// Closes every live connection; new ones are closed at once until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

/// The API server's address, from the control plane's kubeconfig.
fn api_server_addr(cp: &ControlPlane) -> SocketAddr {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cp.kubeconfig).expect("kubeconfig");
    let server = kubeconfig.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("a server in the kubeconfig");
    server
        .strip_prefix("https://")
        .and_then(|hostport| hostport.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("the server {server} is https://<ip>:<port>"))
}

/// A file removed on drop (a kubeconfig copy holds the admin's client key).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A copy of the control plane's kubeconfig whose server is `https://<proxy>`: the API server's
/// certificate is for IP 127.0.0.1 (hack/control-plane.sh), whatever the port.
fn kubeconfig_through(cp: &ControlPlane, proxy: SocketAddr) -> TempFile {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let text = std::fs::read_to_string(&cp.kubeconfig).expect("kubeconfig readable");
    let mut replaced = 0;
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| match line.split_once("server:") {
            Some((indent, _)) if indent.trim().is_empty() => {
                replaced += 1;
                format!("{indent}server: https://{proxy}")
            }
            _ => line.to_owned(),
        })
        .collect();
    assert_eq!(
        replaced,
        1,
        "one server line in {}",
        cp.kubeconfig.display()
    );
    let path = std::env::temp_dir().join(format!(
        "hookrelay-proxied-{}-{}.kubeconfig",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, rewritten.join("\n") + "\n").expect("kubeconfig written");
    TempFile(path)
}

/// POSTs one event (document_id `id`) to `/api/events`, with `id` as its key when `keyed`:
/// the status code, None without an answer within 15 s (refused connection, or a process that
/// is gone). In JetStream mode a keyed event is stored for the router of any replica, an
/// unkeyed one routed by the replica that takes it in.
async fn post_event(
    http: &reqwest::Client,
    addr: SocketAddr,
    ns: &str,
    id: &str,
    keyed: bool,
) -> Option<u16> {
    let mut event = json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z",
                           "data": {"document_id": id}});
    if keyed {
        event["id"] = id.into();
    }
    let body = json!([event]);
    let response = http
        .post(format!("http://{addr}/api/events?namespace={ns}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

async fn signal(op: &Operator, sig: &str) {
    let pid = op.child.id().expect("the operator runs").to_string();
    let status = tokio::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid}");
}

// ---- a JetStream replica partitioned from the API server ----

const PARTITION_EVENTS: usize = 200;

/// What the cut-off replica reported while cut off: when /readyz first answered other than
/// 200, and when `hookrelay_routing_view_stale` first read 1 (from the cut).
#[derive(Default, Debug, Clone)]
struct PartitionView {
    first_not_ready: Option<Duration>,
    first_stale: Option<Duration>,
    samples: usize,
}

/// Samples the replica's /readyz and staleness gauge every 250 ms until cancelled.
fn watch_partitioned(
    addr: SocketAddr,
    since: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> Arc<Mutex<PartitionView>> {
    let view = Arc::new(Mutex::new(PartitionView::default()));
    let shared = view.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let ready = readyz(addr).await;
            let stale = metric(addr, "hookrelay_routing_view_stale").await;
            {
                let mut v = shared.lock().unwrap();
                v.samples += 1;
                if ready.is_some_and(|s| s != 200) && v.first_not_ready.is_none() {
                    v.first_not_ready = Some(since.elapsed());
                }
                if stale == Some(1.0) && v.first_stale.is_none() {
                    v.first_stale = Some(since.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    view
}

/// `replicas` JetStream replicas sharing one nats-server: A reaches the API server directly
/// and leads; the others go through a [`TcpProxy`] each. B's proxy is cut, then a Webhook is
/// created (B never sees it) and 200 events are posted to A, half of them keyed: the keyed ones
/// are routed by any replica's router, the others by A as it takes them in, and the stream's
/// consumers hand their work to any replica, B included. Every one must be delivered.
async fn partitioned_replica_loses_no_event(test: &str, replicas: usize) {
    let cp = control_plane();
    let ns = cp.namespace("replicas-cut").await;
    let client = cp.client().await;
    let nats = NatsServer::start().await;
    let args = OperatorArgs::new(&ns)
        .mode("jetstream")
        .nats(&nats.url)
        .leader_elect()
        .fast_lease();

    // A leads, so that the Webhook's status (Ready) is written while B is cut off.
    let a = args.start(cp);
    a.wait_leader(true).await;
    let api = api_server_addr(cp);
    let mut proxied = Vec::new();
    for _ in 1..replicas {
        let proxy = TcpProxy::start(api).await;
        let kubeconfig = kubeconfig_through(cp, proxy.addr);
        let op = args
            .clone()
            .env("KUBECONFIG", kubeconfig.0.to_str().unwrap())
            .start(cp);
        proxied.push((proxy, op, kubeconfig));
    }
    a.wait_ready().await;
    for (proxy, op, _) in &proxied {
        op.wait_ready().await;
        op.wait_leader(false).await;
        assert!(
            proxy.connections.load(Ordering::Relaxed) > 0,
            "the replica reaches the API server through its proxy"
        );
    }
    let (b_proxy, b, _) = &proxied[0];

    b_proxy.cut();
    let cut_at = Instant::now();
    let sampling = tokio_util::sync::CancellationToken::new();
    let view = watch_partitioned(b.metrics_addr, cut_at, sampling.clone());

    // Created after the cut; posted to as soon as it is Ready (not once every replica routes it).
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
    let ready_after_cut = cut_at.elapsed();
    let http = reqwest::Client::new();
    let mut not_accepted = Vec::new();
    for i in 0..PARTITION_EVENTS {
        let status = post_event(
            &http,
            a.listen_addr,
            &ns,
            &format!("cut-{i:03}"),
            i % 2 == 0,
        )
        .await;
        if status != Some(202) {
            not_accepted.push((i, status));
        }
    }
    let posted_at = Instant::now();
    let all_delivered = within(Duration::from_secs(120), || async {
        (receiver.counts().0 >= PARTITION_EVENTS).then_some(())
    })
    .await
    .is_some();
    let deliver_s = posted_at.elapsed().as_secs_f64();
    let (distinct, total) = receiver.counts();
    // Delivery attempts of A, B (and C): who delivered. (+ 0.0: an empty sum is -0.)
    let mut attempts = Vec::new();
    for op in std::iter::once(&a).chain(proxied.iter().map(|(_, op, _)| op)) {
        attempts.push(
            metric_sum(op.metrics_addr, "hookrelay_delivery_attempts_total")
                .await
                .map_or("none".into(), |n| (n + 0.0).to_string()),
        );
    }

    // The readiness of the cut-off replica: sampled for at least 60 s from the cut.
    within(
        Duration::from_secs(60).saturating_sub(cut_at.elapsed()),
        || async {
            let v = view.lock().unwrap().clone();
            (v.first_not_ready.is_some() && v.first_stale.is_some()).then_some(())
        },
    )
    .await;
    sampling.cancel();
    let while_cut = view.lock().unwrap().clone();
    let cut_s = cut_at.elapsed().as_secs_f64();
    b_proxy.restore();
    let restored_at = Instant::now();
    let b_metrics = b.metrics_addr;
    let back = within(Duration::from_secs(60), || async move {
        let ready = readyz(b_metrics).await == Some(200);
        let fresh = metric(b_metrics, "hookrelay_routing_view_stale").await == Some(0.0);
        (ready && fresh).then_some(restored_at.elapsed())
    })
    .await;
    let b_ready_now = readyz(b_metrics).await;
    let b_stale_now = metric(b_metrics, "hookrelay_routing_view_stale").await;

    eprintln!(
        "FIGURES {test}: sent={PARTITION_EVENTS} delivered={distinct} duplicates={} lost={} \
         replicas={replicas} not_accepted={} webhook_ready_after_cut_s={:.1} \
         deliver_s={deliver_s:.1} attempts_by_replica={} cut_s={cut_s:.1} \
         b_not_ready_after_cut_s={} b_stale_after_cut_s={} b_samples={} \
         b_ready_and_fresh_after_restore_s={} b_readyz_at_end={b_ready_now:?} \
         b_stale_at_end={b_stale_now:?} build=debug",
        total - distinct,
        PARTITION_EVENTS.saturating_sub(distinct),
        not_accepted.len(),
        ready_after_cut.as_secs_f64(),
        attempts.join("/"),
        while_cut
            .first_not_ready
            .map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
        while_cut
            .first_stale
            .map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
        while_cut.samples,
        back.map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
    );

    // No event lost.
    assert!(
        not_accepted.is_empty(),
        "replica A refused events (index, status): {not_accepted:?}"
    );
    assert!(
        all_delivered && distinct == PARTITION_EVENTS,
        "{} of {PARTITION_EVENTS} events never reached the receiver within 120 s with replica B \
         cut off from the API server (A log: {}, B log: {})",
        PARTITION_EVENTS - distinct,
        a.log.display(),
        b.log.display()
    );

    // ---- The cut-off replica says so: not ready, its routing view stale; then it recovers ----
    assert!(
        while_cut.first_not_ready.is_some(),
        "replica B's /readyz kept answering 200 for {cut_s:.0} s cut off from the API server \
         (log: {})",
        b.log.display()
    );
    assert!(
        while_cut.first_stale.is_some(),
        "replica B never reported hookrelay_routing_view_stale 1 in {cut_s:.0} s cut off \
         (log: {})",
        b.log.display()
    );
    assert!(
        back.is_some(),
        "replica B not back to /readyz 200 and hookrelay_routing_view_stale 0 within 60 s of \
         the restore (now: readyz {b_ready_now:?}, stale {b_stale_now:?}; log: {})",
        b.log.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_replica_partitioned_from_the_api_server_loses_no_event_with_2_replicas() {
    partitioned_replica_loses_no_event(
        "jetstream_replica_partitioned_from_the_api_server_loses_no_event_with_2_replicas",
        2,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_replica_partitioned_from_the_api_server_loses_no_event_with_3_replicas() {
    partitioned_replica_loses_no_event(
        "jetstream_replica_partitioned_from_the_api_server_loses_no_event_with_3_replicas",
        3,
    )
    .await
}

// ---- a leader through a 30 s API server outage ----

/// Posts every [`POST_EVERY`]: this long before the outage, the outage, and after it.
const BEFORE_OUTAGE: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(30);
const AFTER_OUTAGE: Duration = Duration::from_secs(10);
const POST_EVERY: Duration = Duration::from_millis(100);
/// The leader leads again within this after the API server is back.
const LEADS_AGAIN_WITHIN: Duration = Duration::from_secs(30);

const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// One post's phase, when it was sent, and its answer.
type Posted = Arc<Mutex<Vec<(u8, Instant, Option<u16>)>>>;

/// One operator with `--leader-elect` on a control plane of its own, in ingest `mode`, taking
/// one event every 100 ms through a 30 s stop of the kube-apiserver: it must not exit, must lead
/// again after, and deliver every event it accepted (in direct and jetstream mode it accepts
/// every one: they need nothing from the API server).
async fn leader_through_outage(test: &str, mode: &str) {
    let _serial = OWN_CONTROL_PLANES.lock().await;
    let cp = OwnControlPlane::start(&format!("outage-{mode}")).await;
    let ns = cp.namespace("outage").await;
    let client = cp.client().await;
    let nats = match mode {
        "jetstream" => Some(NatsServer::start().await),
        _ => None,
    };
    let mut args = OperatorArgs::new(&ns)
        .mode(mode)
        .leader_elect()
        .fast_lease();
    if let Some(nats) = &nats {
        args = args.nats(&nats.url);
    }
    let mut op = args.start(&cp);
    op.wait_ready().await;
    op.wait_leader(true).await;
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

    // The producer: one post every 100 ms, each in its own task so that a slow answer does not
    // slow the pace; each records the phase it was sent in.
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let posted: Posted = Arc::default();
    let producing = tokio_util::sync::CancellationToken::new();
    let producer = {
        let (phase, posted, producing) = (phase.clone(), posted.clone(), producing.clone());
        let (listen, ns) = (op.listen_addr, ns.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(POST_EVERY);
            let mut posts = Vec::new();
            let mut i = 0usize;
            while !producing.is_cancelled() {
                tick.tick().await;
                let p = phase.load(Ordering::SeqCst);
                let (http, posted, ns) = (http.clone(), posted.clone(), ns.clone());
                posts.push(tokio::spawn(async move {
                    let sent_at = Instant::now();
                    let status =
                        post_event(&http, listen, &ns, &format!("p{p}-{i:04}"), false).await;
                    posted.lock().unwrap().push((p, sent_at, status));
                }));
                i += 1;
            }
            for post in posts {
                post.await.unwrap();
            }
        })
    };

    // The fault's timeline (stated lengths, not synchronisation).
    tokio::time::sleep(BEFORE_OUTAGE).await;
    phase.store(DURING, Ordering::SeqCst);
    let outage_began = Instant::now();
    cp.stop_apiserver().await;
    let down_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let exited_during_outage = op.child.try_wait().expect("operator status");
    cp.start_apiserver().await;
    let down_s = down_at.elapsed().as_secs_f64();
    phase.store(AFTER, Ordering::SeqCst);
    let back_at = Instant::now();
    let leads_again = {
        let metrics = op.metrics_addr;
        tokio::spawn(async move {
            within(LEADS_AGAIN_WITHIN, || async move {
                (metric(metrics, "hookrelay_leader").await == Some(1.0))
                    .then_some(back_at.elapsed())
            })
            .await
        })
    };
    tokio::time::sleep(AFTER_OUTAGE).await;
    producing.cancel();
    producer.await.unwrap();
    let leads_again = leads_again.await.unwrap();

    let posted = posted.lock().unwrap().clone();
    let accepted = posted.iter().filter(|(_, _, s)| *s == Some(202)).count();
    let count = |p: u8, pred: &dyn Fn(Option<u16>) -> bool| {
        posted
            .iter()
            .filter(|(ph, _, s)| *ph == p && pred(*s))
            .count()
    };
    // Roughly when the process stopped answering, from the stop of the API server.
    let first_unanswered = posted
        .iter()
        .filter(|(_, _, s)| s.is_none())
        .map(|(_, at, _)| at.saturating_duration_since(outage_began))
        .min();
    let during = count(DURING, &|_| true);
    let during_accepted = count(DURING, &|s| s == Some(202));
    let refused = posted
        .iter()
        .filter(|(_, _, s)| s.is_some_and(|s| s != 202))
        .count();
    let no_answer = posted.iter().filter(|(_, _, s)| s.is_none()).count();
    let mut statuses_during: Vec<String> = posted
        .iter()
        .filter(|(ph, _, _)| *ph == DURING)
        .map(|(_, _, s)| s.map_or("none".into(), |s| s.to_string()))
        .collect();
    statuses_during.sort();
    statuses_during.dedup();

    // Delivered: every accepted event, unless the process is gone (then nothing more comes).
    within(Duration::from_secs(60), || {
        let gone = matches!(op.child.try_wait(), Ok(Some(_)));
        let delivered = receiver.counts().0;
        async move { (delivered >= accepted || gone).then_some(()) }
    })
    .await;
    let (distinct, total) = receiver.counts();
    let exit = op.child.try_wait().expect("operator status");

    eprintln!(
        "FIGURES {test}: sent={} delivered={distinct} duplicates={} lost={} mode={mode} \
         accepted={accepted} refused={refused} no_answer={no_answer} \
         posted_during_outage={during} accepted_during_outage={during_accepted} \
         statuses_during_outage={statuses_during:?} down_s={down_s:.1} \
         first_unanswered_post_s_into_outage={} \
         leader_again_s={} exit_during_outage={:?} exit_at_end={:?} build=debug",
        posted.len(),
        total - distinct,
        accepted.saturating_sub(distinct),
        first_unanswered.map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
        leads_again.map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
        exited_during_outage.map(|s| s.to_string()),
        exit.map(|s| s.to_string()),
    );

    assert!(
        exit.is_none(),
        "the operator exited ({:?}) during a {}s API server outage (log: {})",
        exit,
        OUTAGE.as_secs(),
        op.log.display()
    );
    if mode != "durable" {
        assert_eq!(
            during_accepted, during,
            "{mode} ingest needs nothing from the API server: every post during the outage gets \
             202 (answers: {statuses_during:?})"
        );
    }
    assert!(
        distinct >= accepted,
        "{} of the {accepted} accepted events were never delivered (log: {})",
        accepted - distinct,
        op.log.display()
    );
    assert!(
        leads_again.is_some(),
        "hookrelay_leader not 1 within {LEADS_AGAIN_WITHIN:?} after the API server was back \
         (log: {})",
        op.log.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_keeps_running_through_a_30s_api_server_outage_with_direct_ingest() {
    leader_through_outage(
        "leader_keeps_running_through_a_30s_api_server_outage_with_direct_ingest",
        "direct",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_keeps_running_through_a_30s_api_server_outage_with_jetstream_ingest() {
    leader_through_outage(
        "leader_keeps_running_through_a_30s_api_server_outage_with_jetstream_ingest",
        "jetstream",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_keeps_running_through_a_30s_api_server_outage_with_durable_ingest() {
    leader_through_outage(
        "leader_keeps_running_through_a_30s_api_server_outage_with_durable_ingest",
        "durable",
    )
    .await
}

// ---- a leader paused past its lease ----

const PAUSED_EVENTS: usize = 50;
/// How long the resumed old leader is watched.
const WATCH_RESUMED: Duration = Duration::from_secs(15);

/// What an operator has written and sent so far: (status patches, delivery attempts, API
/// requests that write: POST, PUT, PATCH, DELETE), from its /metrics; None without an answer.
async fn writes(addr: SocketAddr) -> Option<(f64, f64, f64)> {
    let (_, body) = tokio::time::timeout(Duration::from_secs(2), http_get(addr, "/metrics"))
        .await
        .ok()??;
    let sum = |family: &str, labels: &[&str]| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(family))
            .filter(|l| labels.is_empty() || labels.iter().any(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0
    };
    Some((
        sum("hookrelay_status_patches_total", &[]),
        sum("hookrelay_delivery_attempts_total", &[]),
        sum(
            "hookrelay_kube_api_requests_total",
            &[
                r#"verb="POST""#,
                r#"verb="PUT""#,
                r#"verb="PATCH""#,
                r#"verb="DELETE""#,
            ],
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_writes_and_delivers_nothing_after_the_new_leader_starts() {
    let test =
        "a_leader_paused_past_its_lease_writes_and_delivers_nothing_after_the_new_leader_starts";
    let cp = control_plane();
    let ns = cp.namespace("replicas-pause").await;
    let client = cp.client().await;
    let args = OperatorArgs::new(&ns)
        .mode("durable")
        .leader_elect()
        .lease("4s", "3s", "1s");
    let mut ops = [args.start(cp), args.start(cp)];
    for op in &ops {
        op.wait_ready().await;
    }
    let leader = one_leader(&ops[0], &ops[1]).await;
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
    let (old, new) = {
        let [a, b] = &mut ops;
        if leader == 0 { (a, b) } else { (b, a) }
    };

    // The old leader is idle (its counters still for 2 s) before it is frozen, so that nothing
    // it had in flight is counted after it is resumed.
    let old_metrics = old.metrics_addr;
    let at_stop = eventually(
        "the leader's write counters still for 2 s",
        Duration::from_secs(60),
        || async move {
            let first = writes(old_metrics).await?;
            // A stillness window, not a synchronisation.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let second = writes(old_metrics).await?;
            (first.0 == second.0 && first.1 == second.1).then_some(second)
        },
    )
    .await;
    signal(old, "-STOP").await;
    let stopped_at = Instant::now();
    new.wait_leader(true).await;
    let takeover_s = stopped_at.elapsed().as_secs_f64();

    let http = reqwest::Client::new();
    let mut not_accepted = Vec::new();
    for i in 0..PAUSED_EVENTS {
        let status = post_event(&http, new.listen_addr, &ns, &format!("pause-{i:03}"), false).await;
        if status != Some(202) {
            not_accepted.push((i, status));
        }
    }
    signal(old, "-CONT").await;
    let resumed_at = Instant::now();

    // The first sample as soon as its /metrics answers, then every 250 ms for 15 s.
    let first = within(WATCH_RESUMED, || async move { writes(old_metrics).await }).await;
    let first_after_s = resumed_at.elapsed().as_secs_f64();
    let mut last = first;
    let mut led_after_resume = false;
    let mut leader_gauge = None;
    while resumed_at.elapsed() < WATCH_RESUMED {
        if let Some(sample) = writes(old_metrics).await {
            last = Some(sample);
        }
        leader_gauge = metric(old_metrics, "hookrelay_leader").await;
        led_after_resume |= leader_gauge == Some(1.0);
        if matches!(old.child.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let old_exit = old.child.try_wait().expect("operator status");

    let all_delivered = within(Duration::from_secs(60), || async {
        (receiver.counts().0 >= PAUSED_EVENTS).then_some(())
    })
    .await
    .is_some();
    let (distinct, total) = receiver.counts();
    let delta = |a: Option<(f64, f64, f64)>, b: Option<(f64, f64, f64)>| {
        a.zip(b).map(|(a, b)| (b.0 - a.0, b.1 - a.1, b.2 - a.2))
    };
    let since_first = delta(first, last);
    let since_stop = delta(Some(at_stop), last);
    eprintln!(
        "FIGURES {test}: sent={PAUSED_EVENTS} delivered={distinct} duplicates={} lost={} \
         not_accepted={} takeover_s={takeover_s:.1} old_metrics_after_resume_s={} \
         old_since_first_sample(status_patches,attempts,kube_writes)={since_first:?} \
         old_since_stop(status_patches,attempts,kube_writes)={since_stop:?} \
         old_leader_gauge_at_end={leader_gauge:?} old_led_after_resume={led_after_resume} \
         old_exit={:?} build=debug",
        total - distinct,
        PAUSED_EVENTS.saturating_sub(distinct),
        not_accepted.len(),
        first.map_or("never".into(), |_| format!("{first_after_s:.1}")),
        old_exit.map(|s| s.to_string()),
    );

    assert!(
        not_accepted.is_empty(),
        "the new leader refused events: {not_accepted:?}"
    );
    assert!(
        all_delivered && distinct == PAUSED_EVENTS,
        "{} of {PAUSED_EVENTS} events not delivered (new leader's log: {})",
        PAUSED_EVENTS - distinct,
        new.log.display()
    );
    // Seen at the receiver even if the old process is gone before its /metrics tells: with one
    // leader delivering to a loopback receiver nothing is sent twice, so a repeat is a delivery
    // by the resumed old leader of an event the new one delivered too.
    assert_eq!(
        total - distinct,
        0,
        "events delivered twice: the resumed old leader delivered (log: {})",
        old.log.display()
    );
    assert!(
        old_exit.is_none() && first.is_some(),
        "the resumed old leader must stay up and answer /metrics (exit {old_exit:?}; log: {})",
        old.log.display()
    );
    let (patches, attempts, _) = since_first.unwrap();
    assert_eq!(
        (patches, attempts),
        (0.0, 0.0),
        "the resumed old leader wrote status patches or made delivery attempts after its first \
         /metrics answer (log: {})",
        old.log.display()
    );
    let (patches, attempts, _) = since_stop.unwrap();
    assert_eq!(
        (patches, attempts),
        (0.0, 0.0),
        "the old leader wrote status patches or made delivery attempts after it was resumed, \
         before its /metrics answered (log: {})",
        old.log.display()
    );
    assert_eq!(
        (leader_gauge, led_after_resume),
        (Some(0.0), false),
        "the resumed old leader must report hookrelay_leader 0 (log: {})",
        old.log.display()
    );
}
