//! Fan-out: one event to N Webhooks (1, 100 and 1,000 by default), all delivering to one
//! receiver under distinct paths (`/fan/<i>`) so that it counts each Webhook's copy; the time
//! from the POST to the last of the N arrivals, over events sent one at a time.
//!
//! Ceiling: the generator itself posts the same signed body to the N paths with the same
//! number of connections as the other scenarios, and waits for the last arrival.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    serve::ListenerExt,
};
use futures::StreamExt;

use crate::{
    SIGNATURE_HEADER, event_body, mac, percentile, sign,
    support::control_plane,
    webhooks::{ReadyWatch, create_webhooks, signing_secret, wait_routed},
};

/// The longest wait for one event to reach every Webhook.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The Webhooks that received each event (by `data.seq`), and when.
#[derive(Default)]
struct FanArrivals {
    by_seq: Mutex<HashMap<u64, Copies>>,
    /// Requests with a missing or wrong signature, or without a `data.seq`.
    invalid: AtomicU64,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Copies {
    webhooks: HashSet<u32>,
    first: Option<Instant>,
    /// The arrival that completed the set so far (a retry of a copy already seen is not it).
    last: Option<Instant>,
}

impl FanArrivals {
    /// Waits until `n` Webhooks received `seq`: (first, last) arrival, or None after
    /// `EVENT_TIMEOUT`.
    async fn wait_all(&self, seq: u64, n: usize) -> Option<(Instant, Instant)> {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so that an arrival in between wakes it.
            changed.as_mut().enable();
            if let Some(copies) = self.by_seq.lock().unwrap().get(&seq)
                && copies.webhooks.len() >= n
            {
                return copies.first.zip(copies.last);
            }
            tokio::time::timeout_at(deadline, changed).await.ok()?;
        }
    }

    fn copies(&self, seq: u64) -> usize {
        self.by_seq
            .lock()
            .unwrap()
            .get(&seq)
            .map_or(0, |c| c.webhooks.len())
    }
}

async fn receive(
    State(arrivals): State<Arc<FanArrivals>>,
    Path(webhook): Path<u32>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let signed = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| hex::decode(v.as_bytes()).ok())
        .is_some_and(|signature| {
            let mut mac = mac();
            hmac::Mac::update(&mut mac, &body);
            hmac::Mac::verify_slice(mac, &signature).is_ok()
        });
    let seq = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["seq"].as_u64());
    let (true, Some(seq)) = (signed, seq) else {
        arrivals.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    };
    {
        let mut by_seq = arrivals.by_seq.lock().unwrap();
        let copies = by_seq.entry(seq).or_default();
        if copies.webhooks.insert(webhook) {
            copies.last = Some(at);
        }
        copies.first.get_or_insert(at);
    }
    arrivals.changed.notify_waiters();
    StatusCode::OK
}

async fn start_receiver() -> (Arc<FanArrivals>, SocketAddr) {
    let arrivals = Arc::new(FanArrivals::default());
    let app = axum::Router::new()
        .route("/fan/{webhook}", axum::routing::post(receive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (arrivals, addr)
}

/// One line of the fan-out table.
#[derive(serde::Serialize)]
pub struct FanoutFigure {
    pub scenario: String,
    pub webhooks: usize,
    pub events: usize,
    /// Events that reached all `webhooks` within `EVENT_TIMEOUT`.
    pub complete: usize,
    /// From the POST to the last of the N arrivals, over the complete events.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// From the POST to the first arrival.
    pub first_p50_ms: Option<f64>,
    /// Failed POSTs, invalid signatures and events that did not reach every Webhook.
    pub errors: usize,
    /// How long it took to add this step's Webhooks until all were routed and Ready.
    pub setup_s: Option<f64>,
}

impl FanoutFigure {
    fn new(scenario: String, webhooks: usize, events: usize) -> FanoutFigure {
        FanoutFigure {
            scenario,
            webhooks,
            events,
            complete: 0,
            p50_ms: None,
            p99_ms: None,
            first_p50_ms: None,
            errors: 0,
            setup_s: None,
        }
    }

    fn latencies(&mut self, mut last: Vec<Duration>, mut first: Vec<Duration>) {
        last.sort_unstable();
        first.sort_unstable();
        self.complete = last.len();
        self.p50_ms = percentile(&last, 0.50);
        self.p99_ms = percentile(&last, 0.99);
        self.first_p50_ms = percentile(&first, 0.50);
    }
}

pub struct FanoutSettings {
    pub sizes: Vec<usize>,
    pub events: usize,
    pub connections: usize,
}

/// The ceiling for every size, then each mode.
pub async fn fanout(modes: &[&str], settings: &FanoutSettings) -> Vec<FanoutFigure> {
    let (arrivals, receiver) = start_receiver().await;
    let next_seq = AtomicU64::new(0);
    let mut figures = Vec::new();
    for &n in &settings.sizes {
        figures.push(ceiling(n, &arrivals, receiver, &next_seq, settings).await);
    }
    for mode in modes {
        figures.extend(operator(mode, &arrivals, receiver, &next_seq, settings).await);
    }
    figures
}

/// The generator posting each event to the N paths itself, `connections` at a time.
async fn ceiling(
    n: usize,
    arrivals: &FanArrivals,
    receiver: SocketAddr,
    next_seq: &AtomicU64,
    settings: &FanoutSettings,
) -> FanoutFigure {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.connections)
        .tcp_nodelay(true)
        .build()
        .expect("client builds");
    let mut figure = FanoutFigure::new(
        format!("ceiling: generator -> {n} paths"),
        n,
        settings.events,
    );
    let (mut last, mut first) = (Vec::new(), Vec::new());
    for _ in 0..settings.events {
        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
        let body = event_body(seq);
        let signature = sign(body.as_bytes());
        let at = Instant::now();
        let failed = futures::stream::iter(0..n)
            .map(|i| {
                client
                    .post(format!("http://{receiver}/fan/{i}"))
                    .header("content-type", "application/json")
                    .header(SIGNATURE_HEADER, &signature)
                    .body(body.clone())
                    .send()
            })
            .buffer_unordered(settings.connections)
            .filter(|r| std::future::ready(!r.as_ref().is_ok_and(|r| r.status().is_success())))
            .count()
            .await;
        figure.errors += failed;
        match arrivals.wait_all(seq, n).await {
            Some((f, l)) => {
                first.push(f - at);
                last.push(l - at);
            }
            None => figure.errors += 1,
        }
    }
    figure.errors += arrivals.invalid.swap(0, Ordering::Relaxed) as usize;
    figure.latencies(last, first);
    figure
}

/// The operator in `mode` watching a fresh namespace; Webhooks added step by step up to each
/// size, then events sent one at a time.
async fn operator(
    mode: &str,
    arrivals: &FanArrivals,
    receiver: SocketAddr,
    next_seq: &AtomicU64,
    settings: &FanoutSettings,
) -> Vec<FanoutFigure> {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&format!("fanout-{mode}")).await;
    let (op, _nats) = crate::start_operator(cp, mode, &ns).await;
    signing_secret(&client, &ns, "fanout", crate::SECRET).await;
    let mut ready = ReadyWatch::start(&client, &ns);
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client builds");
    let url = format!("http://{}/api/events?namespace={ns}", op.listen_addr);

    let mut figures = Vec::new();
    let mut created = 0;
    for &n in &settings.sizes {
        let setup = Instant::now();
        create_webhooks(&client, &ns, created..n, "fanout", |i| {
            format!("http://{receiver}/fan/{i}")
        })
        .await;
        created = created.max(n);
        tokio::join!(wait_routed(op.metrics_addr, n), ready.wait_for(n));
        let mut figure = FanoutFigure::new(
            format!("fan-out to {n} Webhooks, {mode}"),
            n,
            settings.events,
        );
        figure.setup_s = Some(setup.elapsed().as_secs_f64());
        let (mut last, mut first) = (Vec::new(), Vec::new());
        for _ in 0..settings.events {
            let seq = next_seq.fetch_add(1, Ordering::Relaxed);
            let at = Instant::now();
            let accepted = match http
                .post(&url)
                .header("content-type", "application/json")
                .body(event_body(seq))
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => true,
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    eprintln!("fan-out {mode}: POST answered {status}: {text}");
                    false
                }
                Err(e) => {
                    eprintln!("fan-out {mode}: POST failed: {e}");
                    false
                }
            };
            if !accepted {
                figure.errors += 1;
                continue;
            }
            match arrivals.wait_all(seq, n).await {
                Some((f, l)) => {
                    first.push(f - at);
                    last.push(l - at);
                }
                None => {
                    eprintln!(
                        "fan-out {mode}: event {seq} reached {} of {n} Webhooks in {EVENT_TIMEOUT:?}",
                        arrivals.copies(seq)
                    );
                    figure.errors += 1;
                }
            }
        }
        figure.errors += arrivals.invalid.swap(0, Ordering::Relaxed) as usize;
        figure.latencies(last, first);
        eprintln!(
            "{}: {} of {} complete, p50 {:?} ms, p99 {:?} ms (set-up {:?} s)",
            figure.scenario,
            figure.complete,
            figure.events,
            figure.p50_ms,
            figure.p99_ms,
            figure.setup_s
        );
        figures.push(figure);
    }
    figures
}
