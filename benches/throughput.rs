//! Events per second and latency end to end through `POST /api/events`, each next to a ceiling
//! measured in the same run.
//!
//! - One load generator (16 keep-alive connections by default) posts contract-shaped bodies, one
//!   event per request, each with a unique `data.seq`.
//! - One in-process receiver verifies the `X-Webhook-Signature` of every request (HMAC-SHA256 of
//!   the raw body with the Webhook's secret) and records when each `seq` arrived.
//! - Ceiling: the generator posts the same bodies, signed by itself, straight to the receiver.
//! - The operator runs as a release process against a real kube-apiserver + etcd, in `direct`
//!   and then in `durable` mode, with one Webhook to the receiver; saturation is a closed loop,
//!   fixed rates an open loop (sent at the rate whatever the answers). Latency is from the POST
//!   being sent to the receiver's arrival.
//!
//! Also (BENCHMARKS.md, "How it works"): the operator's CPU (and nats-server's, in JetStream
//! runs), memory and status patches per run (`throughput/cost.rs`), fan-out of one event to 1, 100 and 1,000 Webhooks
//! (`throughput/fanout.rs`), N Webhooks to Ready (`throughput/webhooks.rs`), and, when
//! JetStream is measured, the floor under it: one event stored, handed out and acked by a
//! nats-server with nothing else around it (`throughput/nats_floor.rs`).
//!
//! Prints two tables and writes them as JSON to `target/bench/throughput.json`.
//!
//! Run: `cargo bench --bench throughput`. Knobs (environment):
//! `HOOKRELAY_BENCH_SECONDS` (each saturation run, default 10),
//! `HOOKRELAY_BENCH_RATE_SECONDS` (each fixed-rate run, default 10),
//! `HOOKRELAY_BENCH_CONNECTIONS` (default 16),
//! `HOOKRELAY_BENCH_DRAIN_SECONDS` (longest wait for the last deliveries, default 60),
//! `HOOKRELAY_BENCH_MODES` (the ingest modes to measure, comma-separated, default all),
//! `HOOKRELAY_BENCH_RATES` (default 200,1000,5000), `HOOKRELAY_BENCH_MAX_IN_FLIGHT` (512),
//! `HOOKRELAY_BENCH_SCENARIOS` (modes,fanout,webhooks), `HOOKRELAY_BENCH_FANOUT` (1,100,1000),
//! `HOOKRELAY_BENCH_FANOUT_EVENTS` (20), `HOOKRELAY_BENCH_FANOUT_MODES` (the modes),
//! `HOOKRELAY_BENCH_WEBHOOKS` (10000), `HOOKRELAY_BENCH_GENERATOR` (`process`: the load
//! generator of the ceiling and of every ingest mode runs in a process of its own,
//! `throughput/generator.rs`; default: in this process, beside the receiver).

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "throughput/cost.rs"]
mod cost;
#[path = "throughput/fanout.rs"]
mod fanout;
#[path = "throughput/generator.rs"]
mod generator;
#[path = "throughput/nats_floor.rs"]
mod nats_floor;
#[path = "throughput/webhooks.rs"]
mod webhooks;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    serve::ListenerExt,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use support::{NatsServer, Operator, control_plane, create_webhook};

/// The Webhook's signing secret, which the receiver verifies with.
const SECRET: &str = "bench-secret-0123456789abcdef";
const SIGNATURE_HEADER: &str = "x-webhook-signature";
const CEILING: &str = "ceiling: generator -> receiver";
/// A run ends when no delivery arrived for this long after the load stopped.
const DRAIN_IDLE: Duration = Duration::from_secs(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The document-processing contract's `document.completed` event with a sequence number in its data.
fn event_body(seq: u64) -> String {
    format!(
        r#"{{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{{"document_id":123,"filename":"important_document.pdf","status":"completed","processing_time_ms":5200,"content_type":"pdf","folder_id":1,"seq":{seq}}}}}"#
    )
}

fn mac() -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("HMAC takes any key length")
}

fn sign(body: &[u8]) -> String {
    let mut mac = mac();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// What the receiver saw since it was last drained.
#[derive(Default)]
struct Arrivals {
    /// (seq, when) of every request whose signature was valid.
    valid: Mutex<Vec<(u64, Instant)>>,
    /// Requests with a missing or wrong signature, or without a `data.seq`.
    invalid: AtomicU64,
}

impl Arrivals {
    fn take(&self) -> (Vec<(u64, Instant)>, u64) {
        (
            std::mem::take(&mut *self.valid.lock().unwrap()),
            self.invalid.swap(0, Ordering::Relaxed),
        )
    }

    fn len(&self) -> usize {
        self.valid.lock().unwrap().len()
    }
}

async fn receive(
    State(arrivals): State<Arc<Arrivals>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let signed = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| hex::decode(v.as_bytes()).ok())
        .is_some_and(|signature| {
            let mut mac = mac();
            mac.update(&body);
            mac.verify_slice(&signature).is_ok()
        });
    let seq = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["seq"].as_u64());
    match (signed, seq) {
        (true, Some(seq)) => {
            arrivals.valid.lock().unwrap().push((seq, at));
            StatusCode::OK
        }
        _ => {
            arrivals.invalid.fetch_add(1, Ordering::Relaxed);
            StatusCode::UNAUTHORIZED
        }
    }
}

async fn start_receiver() -> (Arc<Arrivals>, std::net::SocketAddr) {
    let arrivals = Arc::new(Arrivals::default());
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Small requests and answers: no Nagle delay on either side.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (arrivals, addr)
}

/// How the server answered one POST.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reply {
    Accepted,
    TooManyRequests,
    Failed,
    /// Not sent: at its time, `HOOKRELAY_BENCH_MAX_IN_FLIGHT` earlier requests were still
    /// unanswered (a fixed rate the server cannot hold).
    Unsent,
}

/// One request the generator sent.
struct Sent {
    seq: u64,
    at: Instant,
    reply: Reply,
}

/// The load generator: keep-alive connections to one URL.
struct Load {
    client: reqwest::Client,
    url: String,
    /// Sign the bodies itself (the ceiling, where there is no operator to sign).
    sign: bool,
    next_seq: Arc<AtomicU64>,
    first_failure: Mutex<Option<String>>,
}

impl Load {
    fn new(url: String, sign: bool, next_seq: Arc<AtomicU64>, connections: usize) -> Load {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .build()
            .expect("client builds");
        Load {
            client,
            url,
            sign,
            next_seq,
            first_failure: Mutex::new(None),
        }
    }

    async fn post(&self) -> Sent {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let body = event_body(seq);
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json");
        if self.sign {
            request = request.header(SIGNATURE_HEADER, sign(body.as_bytes()));
        }
        let at = Instant::now();
        let reply = match request.body(body).send().await {
            Ok(response) => {
                let status = response.status();
                // Read to the end, so that the connection goes back to the pool.
                let text = response.text().await.unwrap_or_default();
                if status.is_success() {
                    Reply::Accepted
                } else if status == StatusCode::TOO_MANY_REQUESTS {
                    Reply::TooManyRequests
                } else {
                    self.failed(format!("{status}: {text}"));
                    Reply::Failed
                }
            }
            Err(e) => {
                self.failed(e.to_string());
                Reply::Failed
            }
        };
        Sent { seq, at, reply }
    }

    fn failed(&self, why: String) {
        self.first_failure.lock().unwrap().get_or_insert(why);
    }

    /// One run's load: a closed loop (`rate` None) or a fixed rate, sent from this process or
    /// from a generator process of its own (`HOOKRELAY_BENCH_GENERATOR=process`).
    async fn run(self: &Arc<Self>, rate: Option<u32>, settings: &Settings) -> Vec<Sent> {
        if settings.separate_generator {
            return generator::in_child(self, rate, settings).await;
        }
        match rate {
            None => {
                self.closed_loop(settings.connections, settings.seconds)
                    .await
            }
            Some(rate) => {
                self.open_loop(rate, settings.rate_seconds, settings.max_in_flight)
                    .await
            }
        }
    }

    /// `connections` clients, each sending its next request when the last one was answered.
    async fn closed_loop(self: &Arc<Self>, connections: usize, duration: Duration) -> Vec<Sent> {
        let end = Instant::now() + duration;
        let workers: Vec<_> = (0..connections)
            .map(|_| {
                let load = self.clone();
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    while Instant::now() < end {
                        sent.push(load.post().await);
                    }
                    sent
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await.unwrap());
        }
        all
    }

    /// `rate` requests per second for `duration`, each sent on time whether or not earlier ones
    /// were answered, as long as fewer than `max_in_flight` are unanswered; a request due while
    /// that many are is not sent (`Reply::Unsent`), so that a rate the server cannot hold ends
    /// on time and within the file descriptors and the operator's `--max-connections`.
    async fn open_loop(
        self: &Arc<Self>,
        rate: u32,
        duration: Duration,
        max_in_flight: usize,
    ) -> Vec<Sent> {
        let start = tokio::time::Instant::now();
        let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
        let mut requests = tokio::task::JoinSet::new();
        let mut unsent = Vec::new();
        for i in 0..total {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / f64::from(rate)))
                .await;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                unsent.push(Sent {
                    seq: u64::MAX,
                    at: Instant::now(),
                    reply: Reply::Unsent,
                });
                continue;
            };
            let load = self.clone();
            requests.spawn(async move {
                let sent = load.post().await;
                drop(permit);
                sent
            });
        }
        let mut sent = requests.join_all().await;
        sent.extend(unsent);
        sent
    }
}

/// One line of the table.
#[derive(serde::Serialize)]
struct Figure {
    scenario: String,
    /// Events accepted and delivered with a valid signature, per second from the first POST to
    /// the last arrival.
    events_per_s: f64,
    /// `events_per_s` over the same run's ceiling (saturation runs only).
    ratio_to_ceiling: Option<f64>,
    /// `events_per_s` over the same run's API-server write ceiling (durable saturation only).
    ratio_to_api_writes: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    sent: usize,
    /// Fixed rates: requests due while `HOOKRELAY_BENCH_MAX_IN_FLIGHT` were unanswered.
    unsent: usize,
    delivered: usize,
    /// Answered 429 (not an error: back-pressure).
    too_many_requests: usize,
    /// Other failed requests, invalid signatures, and accepted events never delivered.
    errors: usize,
}

/// Waits until every accepted event arrived, or nothing arrived for `DRAIN_IDLE`, or `limit`.
async fn drain(arrivals: &Arrivals, accepted: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let (mut seen, mut progress_at) = (arrivals.len(), Instant::now());
    while seen < accepted && Instant::now() < deadline && progress_at.elapsed() < DRAIN_IDLE {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now_seen = arrivals.len();
        if now_seen > seen {
            (seen, progress_at) = (now_seen, Instant::now());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    let i = ((p * sorted.len() as f64).ceil() as usize).checked_sub(1)?;
    sorted.get(i).map(|d| d.as_secs_f64() * 1000.0)
}

async fn measure(
    scenario: &str,
    load: &Arc<Load>,
    arrivals: &Arrivals,
    rate: Option<u32>,
    settings: &Settings,
) -> Figure {
    arrivals.take();
    let mut sent = load.run(rate, settings).await;
    let unsent = sent.iter().filter(|s| s.reply == Reply::Unsent).count();
    sent.retain(|s| s.reply != Reply::Unsent);
    let accepted = sent.iter().filter(|s| s.reply == Reply::Accepted).count();
    drain(arrivals, accepted, settings.drain).await;
    let (valid, invalid) = arrivals.take();
    let mut first_arrival: HashMap<u64, Instant> = HashMap::with_capacity(valid.len());
    for (seq, at) in valid {
        first_arrival.entry(seq).or_insert(at);
    }
    let mut latencies = Vec::with_capacity(accepted);
    let mut last_arrival = None;
    for s in sent.iter().filter(|s| s.reply == Reply::Accepted) {
        if let Some(&at) = first_arrival.get(&s.seq) {
            latencies.push(at.saturating_duration_since(s.at));
            last_arrival = last_arrival.max(Some(at));
        }
    }
    latencies.sort_unstable();
    let delivered = latencies.len();
    let first_sent = sent.iter().map(|s| s.at).min();
    let events_per_s = match (first_sent, last_arrival) {
        (Some(first), Some(last)) => delivered as f64 / (last - first).as_secs_f64(),
        _ => 0.0,
    };
    let failed = sent.iter().filter(|s| s.reply == Reply::Failed).count();
    let figure = Figure {
        scenario: scenario.to_owned(),
        events_per_s,
        ratio_to_ceiling: None,
        ratio_to_api_writes: None,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        sent: sent.len(),
        unsent,
        delivered,
        too_many_requests: sent
            .iter()
            .filter(|s| s.reply == Reply::TooManyRequests)
            .count(),
        errors: failed + invalid as usize + (accepted - delivered),
    };
    eprintln!(
        "{scenario}: {} sent, {unsent} unsent, {accepted} accepted, {delivered} delivered, {} x 429, {failed} failed, {invalid} invalid signatures",
        figure.sent, figure.too_many_requests
    );
    if let Some(why) = load.first_failure.lock().unwrap().take() {
        eprintln!("  first failure: {why}");
    }
    figure
}

struct Settings {
    seconds: Duration,
    rate_seconds: Duration,
    connections: usize,
    drain: Duration,
    /// Fixed rates: the most requests unanswered at once (`HOOKRELAY_BENCH_MAX_IN_FLIGHT`).
    max_in_flight: usize,
    /// The load generator runs in a process of its own (`HOOKRELAY_BENCH_GENERATOR=process`).
    separate_generator: bool,
}

/// The operator in `mode` watching `ns`, with the flags of every scenario; JetStream mode gets a
/// nats-server of its own, stopped when the returned handle is dropped.
async fn start_operator(
    cp: &support::ControlPlane,
    mode: &str,
    ns: &str,
) -> (Operator, Option<NatsServer>) {
    let nats = if mode == "jetstream" {
        Some(NatsServer::start().await)
    } else {
        None
    };
    let mut args = vec![
        "--ingest-mode",
        mode,
        "--disable-auth",
        "--direct-queue",
        "100000",
        "--egress-allow-http",
        "--egress-allow-cidr",
        "127.0.0.0/8",
        "--watch-namespace",
        ns,
    ];
    if let Some(nats) = &nats {
        args.extend(["--nats-url", nats.url.as_str()]);
    }
    let op = Operator::start(cp, &args);
    op.wait_ready().await;
    (op, nats)
}

/// The operator in `mode`, watching a fresh namespace with one Webhook to the receiver; the
/// figures of its scenarios.
async fn operator_scenarios(
    mode: &str,
    rates: &[u32],
    receiver: std::net::SocketAddr,
    arrivals: &Arrivals,
    next_seq: &Arc<AtomicU64>,
    settings: &Settings,
    costs: &mut Vec<cost::OperatorCost>,
) -> Vec<Figure> {
    let cp = control_plane();
    let ns = cp.namespace(&format!("throughput-{mode}")).await;
    let (op, nats) = start_operator(cp, mode, &ns).await;
    create_webhook(
        &cp.client().await,
        &ns,
        "receiver",
        &format!("http://{receiver}/hook"),
        SECRET,
        serde_json::json!({}),
    )
    .await;
    let load = Arc::new(Load::new(
        format!("http://{}/api/events?namespace={ns}", op.listen_addr),
        false,
        next_seq.clone(),
        settings.connections,
    ));
    let mut figures = Vec::new();
    for rate in std::iter::once(None).chain(rates.iter().copied().map(Some)) {
        let scenario = match rate {
            None => format!("{mode}, saturation"),
            Some(rate) => format!("{mode}, {rate}/s"),
        };
        let probe = cost::Probe::start(&op, nats.as_ref().map(NatsServer::pid)).await;
        let figure = measure(&scenario, &load, arrivals, rate, settings).await;
        costs.push(probe.finish(&scenario, figure.delivered, 1).await);
        figures.push(figure);
    }
    figures
}

/// The API server's own ceiling for what the durable mode does per event: plain creates of a
/// small object (a ConfigMap about the size of a DocumentEvent), closed loop, with the same
/// number of concurrent clients.
async fn api_write_ceiling(settings: &Settings) -> Figure {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cp = control_plane();
    let ns = cp.namespace("throughput-writes").await;
    let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(cp.client().await, &ns);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + settings.seconds;
    let workers: Vec<_> = (0..settings.connections)
        .map(|_| {
            let (configmaps, next) = (configmaps.clone(), next.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                while Instant::now() < end {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    let object: ConfigMap = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("write-{seq}")},
                        "data": {"event": event_body(seq)},
                    }))
                    .unwrap();
                    let at = Instant::now();
                    let created = configmaps
                        .create(&kube::api::PostParams::default(), &object)
                        .await;
                    done.push((at.elapsed(), created.is_ok()));
                }
                done
            })
        })
        .collect();
    let mut done = Vec::new();
    for worker in workers {
        done.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    let mut latencies: Vec<_> = done.iter().filter(|d| d.1).map(|d| d.0).collect();
    latencies.sort_unstable();
    let errors = done.len() - latencies.len();
    eprintln!(
        "API-server creates: {} sent, {} created, {errors} failed",
        done.len(),
        latencies.len()
    );
    Figure {
        scenario: "ceiling: API-server creates (ConfigMap)".to_owned(),
        events_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        ratio_to_ceiling: None,
        ratio_to_api_writes: None,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        sent: done.len(),
        unsent: 0,
        delivered: latencies.len(),
        too_many_requests: 0,
        errors,
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

/// A comma-separated list from the environment, or `default`.
fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_numbers<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    env_list(name, default)
        .iter()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // reqwest is built without a default TLS provider (the operator installs ring at start).
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Ok(job) = std::env::var(generator::JOB) {
        generator::serve(&job).await;
        return;
    }
    let settings = Settings {
        seconds: Duration::from_secs(env_or("HOOKRELAY_BENCH_SECONDS", 10)),
        rate_seconds: Duration::from_secs(env_or("HOOKRELAY_BENCH_RATE_SECONDS", 10)),
        connections: env_or("HOOKRELAY_BENCH_CONNECTIONS", 16),
        drain: Duration::from_secs(env_or("HOOKRELAY_BENCH_DRAIN_SECONDS", 60)),
        max_in_flight: env_or("HOOKRELAY_BENCH_MAX_IN_FLIGHT", 512),
        separate_generator: std::env::var("HOOKRELAY_BENCH_GENERATOR").as_deref() == Ok("process"),
    };
    let scenarios = env_list("HOOKRELAY_BENCH_SCENARIOS", "modes,fanout,webhooks");
    let modes = env_list("HOOKRELAY_BENCH_MODES", "direct,durable,jetstream");
    let rates: Vec<u32> = env_numbers("HOOKRELAY_BENCH_RATES", "200,1000,5000");
    let next_seq = Arc::new(AtomicU64::new(0));
    let (arrivals, receiver) = start_receiver().await;

    let mut figures = Vec::new();
    let mut costs = Vec::new();
    let mut generator_cpu_per_1000 = None;
    let mut nats_floor = None;
    if scenarios.iter().any(|s| s == "modes") {
        let ceiling_load = Arc::new(Load::new(
            format!("http://{receiver}/hook"),
            true,
            next_seq.clone(),
            settings.connections,
        ));
        let child_cpu = || Duration::from_nanos(generator::CHILD_CPU_NS.load(Ordering::Relaxed));
        let cpu_before = cost::cpu_time(std::process::id()) + child_cpu();
        let ceiling = measure(CEILING, &ceiling_load, &arrivals, None, &settings).await;
        // What sending, receiving and verifying costs (here and in a generator process): the
        // reference for the operator's CPU per 1,000 deliveries.
        let cpu_after = cost::cpu_time(std::process::id()) + child_cpu();
        let cpu_ms = (cpu_after - cpu_before).as_secs_f64() * 1000.0;
        generator_cpu_per_1000 =
            (ceiling.delivered > 0).then(|| cpu_ms / ceiling.delivered as f64 * 1000.0);
        let api_writes = api_write_ceiling(&settings).await;
        figures.extend([ceiling, api_writes]);
        if modes.iter().any(|m| m == "jetstream") {
            nats_floor = Some(nats_floor::measure(settings.seconds, settings.connections).await);
        }
        for mode in ["direct", "durable", "jetstream"] {
            if modes.iter().any(|m| m == mode) {
                figures.extend(
                    operator_scenarios(
                        mode, &rates, receiver, &arrivals, &next_seq, &settings, &mut costs,
                    )
                    .await,
                );
            }
        }
        let (ceiling_rate, api_write_rate) = (figures[0].events_per_s, figures[1].events_per_s);
        for f in &mut figures {
            // A fixed rate is the rate asked for: only saturation compares with a ceiling.
            if f.scenario.ends_with("saturation") || f.scenario == CEILING {
                f.ratio_to_ceiling = (ceiling_rate > 0.0).then(|| f.events_per_s / ceiling_rate);
            }
            if f.scenario == "durable, saturation" {
                f.ratio_to_api_writes =
                    (api_write_rate > 0.0).then(|| f.events_per_s / api_write_rate);
            }
        }
    }
    let fanout = if scenarios.iter().any(|s| s == "fanout") {
        let fanout_modes = env_list("HOOKRELAY_BENCH_FANOUT_MODES", &modes.join(","));
        let fanout_modes: Vec<&str> = fanout_modes.iter().map(String::as_str).collect();
        let fanout_settings = fanout::FanoutSettings {
            sizes: env_numbers("HOOKRELAY_BENCH_FANOUT", "1,100,1000"),
            events: env_or("HOOKRELAY_BENCH_FANOUT_EVENTS", 20),
            connections: settings.connections,
        };
        fanout::fanout(&fanout_modes, &fanout_settings).await
    } else {
        Vec::new()
    };
    let webhook_sync = if scenarios.iter().any(|s| s == "webhooks") {
        Some(webhooks::sync(env_or("HOOKRELAY_BENCH_WEBHOOKS", 10_000)).await)
    } else {
        None
    };

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n{cpus} CPUs, {} connections, saturation {:?}, fixed rates {:?} each (at most {} requests in flight)\n",
        settings.connections, settings.seconds, settings.rate_seconds, settings.max_in_flight
    );
    if !figures.is_empty() {
        print_throughput_table(&figures);
    }
    print_second_table(
        &fanout,
        webhook_sync.as_ref(),
        &costs,
        generator_cpu_per_1000,
        nats_floor.as_ref(),
    );

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| support::repo_root().join("target"))
        .join("bench");
    std::fs::create_dir_all(&dir).expect("target/bench can be created");
    let path = dir.join("throughput.json");
    let json = serde_json::json!({
        "cpus": cpus,
        "connections": settings.connections,
        "saturation_seconds": settings.seconds.as_secs(),
        "rate_seconds": settings.rate_seconds.as_secs(),
        "max_in_flight": settings.max_in_flight,
        "figures": figures,
        "generator_cpu_ms_per_1000_requests": generator_cpu_per_1000,
        "jetstream_floor": nats_floor,
        "operator_costs": costs,
        "fanout": fanout,
        "webhook_sync": webhook_sync,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("JSON written");
    println!("\nwritten to {}", path.display());
}

fn print_throughput_table(figures: &[Figure]) {
    println!(
        "| scenario | events/s | vs ceiling | vs API writes | p50 ms | p99 ms | sent | unsent | delivered | 429 | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in figures {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f.scenario,
            f.events_per_s,
            ratio(f.ratio_to_ceiling),
            ratio(f.ratio_to_api_writes),
            ms(f.p50_ms),
            ms(f.p99_ms),
            f.sent,
            f.unsent,
            f.delivered,
            f.too_many_requests,
            f.errors
        );
    }
}

/// Fan-out, N Webhooks, status patches and the operator's CPU and memory: one line each, with
/// the same-run ceiling it compares with and the target set for it.
fn print_second_table(
    fanout: &[fanout::FanoutFigure],
    sync: Option<&webhooks::SyncFigure>,
    costs: &[cost::OperatorCost],
    generator_cpu_per_1000: Option<f64>,
    nats_floor: Option<&nats_floor::NatsFloor>,
) {
    println!("\n| scenario | figure | same-run ceiling | target | notes |");
    println!("|---|---|---|---|---|");
    if let Some(f) = nats_floor {
        println!(
            "| ceiling: JetStream store + hand-out + ack, nothing else | {:.0} events/s | - | - | nats-server {:.2} CPU-ms per 1,000, its client {:.2}; {} events |",
            f.events_per_s, f.nats_cpu_ms_per_1000, f.client_cpu_ms_per_1000, f.events
        );
    }
    for f in fanout.iter().filter(|f| !f.scenario.starts_with("ceiling")) {
        let ceiling = fanout
            .iter()
            .find(|c| c.scenario.starts_with("ceiling") && c.webhooks == f.webhooks);
        println!(
            "| {} | p50 {} / p99 {} ms to the last arrival | {} | {} | {} of {} events complete, {} errors; first arrival p50 {} ms; set-up {:.1} s |",
            f.scenario,
            ms(f.p50_ms),
            ms(f.p99_ms),
            ceiling.map_or_else(
                || "-".to_owned(),
                |c| format!("p50 {} / p99 {} ms", ms(c.p50_ms), ms(c.p99_ms))
            ),
            if f.webhooks == 1000 {
                "p99 < 50 ms"
            } else {
                "-"
            },
            f.complete,
            f.events,
            f.errors,
            ms(f.first_p50_ms),
            f.setup_s.unwrap_or(0.0),
        );
    }
    if let Some(s) = sync {
        println!(
            "| {} Webhooks: operator start to all Ready | {:.1} s (all routed {:.1} s) | the API server created them in {:.1} s before the operator started, and took {:.1} s for one status write each from a plain client | < 5 s | operator CPU {:.1} s, {} status patches, {} API requests |",
            s.webhooks,
            s.ready_s,
            s.routed_s,
            s.created_s,
            s.status_ceiling_s,
            s.cpu_s,
            s.status_patches,
            s.kube_api_requests
        );
        println!(
            "| {} Webhooks: operator RSS | {:.1} MiB (peak {:.1} MiB) | - | < 100 MB | a restarted operator: /readyz in {:.1} s, RSS {:.1} MiB |",
            s.webhooks, s.rss_mib, s.peak_rss_mib, s.restart_ready_s, s.restart_rss_mib
        );
    }
    for c in costs {
        println!(
            "| {}: operator | {} CPU-ms per 1,000 deliveries{}, peak RSS {:.1} MiB | generator + receiver: {} CPU-ms per 1,000 | - | {} deliveries in {:.1} s, {:.2} cores; RSS {:.1} -> {:.1} MiB; {:.2} Webhook status patches/s per Webhook, {} DocumentEvent patches, {} API requests{} |",
            c.scenario,
            ms(c.cpu_ms_per_1000_deliveries),
            c.nats_cpu_ms_per_1000_deliveries
                .map_or_else(String::new, |n| format!(" (nats-server: {n:.2} more)")),
            c.peak_rss_mib,
            ms(generator_cpu_per_1000),
            c.deliveries,
            c.seconds,
            c.cores,
            c.rss_before_mib,
            c.rss_after_mib,
            c.webhook_patches_per_webhook_per_s,
            c.event_status_patches,
            c.kube_api_requests,
            c.nats_cpu_ms_per_1000_deliveries
                .map_or_else(String::new, |_| format!(", {} work items parked", c.parked)),
        );
    }
}
