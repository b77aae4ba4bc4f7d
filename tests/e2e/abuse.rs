//! Client-side abuse of the API, measured while it happens: the real binary with
//! authentication on, a legitimate tenant polling and posting through the abuse, /readyz and
//! the process's RSS sampled throughout. api_hardening.rs proves each limit exists; these
//! tests prove the operator keeps serving while a client leans on them.
//!
//! Each test prints one `FIGURES` line (common to the fault tests). Memory is the VmRSS
//! of the debug binary (`build=debug`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::support::{
    NatsServer, Operator, OperatorArgs, control_plane, create_webhook, eventually, http_get,
    rss_mib,
};

const SIGNING_SECRET: &str = "abuse-signing-secret-0123456789";

/// A receiver that counts deliveries by the `data.k` of the event they carry, so that a test
/// knows exactly which events arrived (and which refused ones did not).
#[derive(Clone, Default)]
struct KeyedReceiver {
    seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl KeyedReceiver {
    async fn start() -> (KeyedReceiver, SocketAddr) {
        let receiver = KeyedReceiver::default();
        let seen = receiver.seen.clone();
        let app = axum::Router::new().fallback(axum::routing::post(move |body: String| {
            let seen = seen.clone();
            async move {
                let k = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["data"]["k"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                *seen.lock().unwrap().entry(k).or_default() += 1;
                "ok"
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr)
    }

    /// (distinct events whose key starts with `prefix`, requests for them)
    fn counts(&self, prefix: &str) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .fold((0, 0), |(d, t), (_, n)| (d + 1, t + n))
    }
}

/// The operator binary in one ingest mode with authentication on, watching an abuser's
/// namespace and a legitimate tenant's, each with a Webhook to a [`KeyedReceiver`].
struct Target {
    op: Operator,
    pid: u32,
    abuser_ns: String,
    abuser_token: String,
    abuser_sink: KeyedReceiver,
    tenant_ns: String,
    tenant_token: String,
    tenant_sink: KeyedReceiver,
    _nats: Option<NatsServer>,
}

impl Target {
    async fn start(prefix: &str, mode: &str, extra: &[&str]) -> Target {
        let cp = control_plane();
        let client = cp.client().await;
        let abuser_ns = cp.namespace(&format!("{prefix}-abuser")).await;
        let tenant_ns = cp.namespace(&format!("{prefix}-tenant")).await;
        let nats = match mode {
            "jetstream" => Some(NatsServer::start().await),
            _ => None,
        };
        let mut args = OperatorArgs::new(&format!("{abuser_ns},{tenant_ns}"))
            .with_auth()
            .mode(mode);
        if let Some(nats) = &nats {
            args = args.nats(&nats.url);
        }
        let op = args.args(extra).start(cp);
        op.wait_ready().await;
        let pid = op.child.id().expect("the operator runs");
        let abuser_token = cp.hookrelay_token(&abuser_ns, "abuser").await;
        let tenant_token = cp.hookrelay_token(&tenant_ns, "tenant").await;
        let (abuser_sink, abuser_addr) = KeyedReceiver::start().await;
        let (tenant_sink, tenant_addr) = KeyedReceiver::start().await;
        for (ns, addr) in [(&abuser_ns, abuser_addr), (&tenant_ns, tenant_addr)] {
            create_webhook(
                &client,
                ns,
                "sink",
                &format!("http://{addr}/hook"),
                SIGNING_SECRET,
                json!({"initialBackoffSeconds": 1}),
            )
            .await;
        }
        Target {
            op,
            pid,
            abuser_ns,
            abuser_token,
            abuser_sink,
            tenant_ns,
            tenant_token,
            tenant_sink,
            _nats: nats,
        }
    }

    fn api(&self) -> SocketAddr {
        self.op.listen_addr
    }

    /// Starts the legitimate tenant and the samplers; [`Watch::finish`] ends them.
    fn watch(&self) -> Watch {
        let stop = CancellationToken::new();
        let seen = Arc::new(Mutex::new(Observed {
            rss_peak_mib: rss_mib(self.pid),
            ..Observed::default()
        }));
        let sampler = tokio::spawn(sample(
            self.op.metrics_addr,
            self.pid,
            seen.clone(),
            stop.clone(),
        ));
        let tenant = tokio::spawn(legitimate_tenant(
            self.api(),
            self.tenant_ns.clone(),
            self.tenant_token.clone(),
            seen.clone(),
            stop.clone(),
        ));
        Watch {
            stop,
            seen,
            tasks: vec![sampler, tenant],
        }
    }

    /// Waits until every event the tenant had accepted reached its receiver, exactly once
    /// (its Webhook is healthy: no retry is due).
    async fn tenant_delivered(&self, accepted: usize) -> usize {
        let sink = self.tenant_sink.clone();
        eventually(
            &format!("the tenant's {accepted} accepted events delivered"),
            Duration::from_secs(120),
            || {
                let (distinct, _) = sink.counts("legit-");
                async move { (distinct >= accepted).then_some(distinct) }
            },
        )
        .await
    }

    /// The tenant's part of a FIGURES line, once its accepted events are delivered: what was
    /// sent, delivered, duplicated and lost.
    async fn tenant_figures(&self, seen: &Observed) -> String {
        let sent = seen.legit_events_accepted;
        let delivered = self.tenant_delivered(sent).await;
        format!(
            "sent={sent} delivered={delivered} duplicates={} lost={} recover_s=-",
            self.tenant_sink.counts("legit-").1 - delivered,
            sent.saturating_sub(delivered)
        )
    }

    fn alive(&mut self) -> bool {
        self.op.child.try_wait().expect("waitable").is_none()
    }
}

/// What the samplers and the legitimate tenant saw during the abuse.
#[derive(Debug, Default)]
struct Observed {
    ready_samples: usize,
    ready_samples_bad: usize,
    rss_peak_mib: f64,
    legit_total: usize,
    legit_ok: usize,
    /// 429/503 with Retry-After: a refusal the tenant can act on (allowed only where a test
    /// says so).
    legit_refused: usize,
    /// Anything else, with what it was.
    legit_failures: Vec<String>,
    /// Events of the tenant answered 202.
    legit_events_accepted: usize,
    /// The longest round (a list, then a post, each on a new connection) of the tenant took:
    /// a figure, never asserted.
    legit_slowest_s: f64,
}

struct Watch {
    stop: CancellationToken,
    seen: Arc<Mutex<Observed>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watch {
    async fn finish(self) -> Observed {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("a sampler did not panic");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// /readyz and VmRSS every 200 ms until `stop`.
async fn sample(
    metrics: SocketAddr,
    pid: u32,
    seen: Arc<Mutex<Observed>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let ready = tokio::time::timeout(Duration::from_secs(10), http_get(metrics, "/readyz"))
            .await
            .ok()
            .flatten();
        let rss = rss_mib(pid);
        {
            let mut seen = seen.lock().unwrap();
            seen.ready_samples += 1;
            if !matches!(ready, Some((200, _))) {
                seen.ready_samples_bad += 1;
            }
            seen.rss_peak_mib = seen.rss_peak_mib.max(rss);
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// A well-behaved client of another namespace: lists its Webhooks and posts one event, in
/// turn, each on a new connection (a kept-alive one would hold its slot through any abuse of
/// the connection cap), until `stop`.
async fn legitimate_tenant(
    api: SocketAddr,
    ns: String,
    token: String,
    seen: Arc<Mutex<Observed>>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut n = 0usize;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let list = http
            .get(format!("http://{api}/api/webhooks?namespace={ns}"))
            .bearer_auth(&token)
            .send();
        let post = http
            .post(format!("http://{api}/api/events?namespace={ns}"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(
                json!({"event": "document.completed", "data": {"k": format!("legit-{n}")}})
                    .to_string(),
            )
            .send();
        for (what, answer, want) in [("list", list.await, 200), ("post", post.await, 202)] {
            let verdict = match answer {
                Ok(r) if r.status().as_u16() == want => Ok(()),
                Ok(r)
                    if matches!(r.status().as_u16(), 429 | 503)
                        && r.headers().contains_key("retry-after") =>
                {
                    Err(None)
                }
                Ok(r) => Err(Some(format!(
                    "{what}: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ))),
                Err(e) => Err(Some(format!("{what}: {e}"))),
            };
            let mut seen = seen.lock().unwrap();
            seen.legit_slowest_s = seen.legit_slowest_s.max(started.elapsed().as_secs_f64());
            seen.legit_total += 1;
            match verdict {
                Ok(()) => {
                    seen.legit_ok += 1;
                    if what == "post" {
                        seen.legit_events_accepted += 1;
                    }
                }
                Err(None) => seen.legit_refused += 1,
                Err(Some(failure)) => seen.legit_failures.push(failure),
            }
        }
        n += 1;
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The tenant and readiness held during the abuse, and memory stayed within `growth_mib` of
/// where it started.
fn assert_served_through(seen: &Observed, rss_before: f64, growth_mib: f64) {
    assert!(
        seen.legit_failures.is_empty(),
        "the legitimate tenant failed during the abuse: {:?}",
        seen.legit_failures
    );
    assert!(
        seen.legit_total >= 2,
        "the tenant made no request: {seen:?}"
    );
    assert_eq!(
        seen.ready_samples_bad, 0,
        "not ready during the abuse: {seen:?}"
    );
    assert!(seen.ready_samples > 0);
    assert!(
        seen.rss_peak_mib - rss_before < growth_mib,
        "memory grew from {rss_before:.1} MiB to a peak of {:.1} MiB",
        seen.rss_peak_mib
    );
}

fn figures(test: &str, core: &str, seen: &Observed, before: f64, after: f64, extra: &str) {
    eprintln!(
        "FIGURES {test}: {core} legit_ok={} legit_total={} legit_refused={} legit_slowest_s={:.1} ready_samples={} ready_samples_bad={} rss_before_mib={before:.1} rss_peak_mib={:.1} rss_after_mib={after:.1} build=debug{extra}",
        seen.legit_ok,
        seen.legit_total,
        seen.legit_refused,
        seen.legit_slowest_s,
        seen.ready_samples,
        seen.ready_samples_bad,
        seen.rss_peak_mib,
    );
}

/// Runs `abuse` while the tenant and the samplers run; keeps the tenant going at least until
/// it has made a few requests during the abuse.
async fn during<T>(target: &Target, abuse: impl std::future::Future<Output = T>) -> (T, Observed) {
    let watch = target.watch();
    let result = abuse.await;
    let seen = watch.seen.clone();
    eventually(
        "the tenant to make requests during the abuse",
        Duration::from_secs(120),
        || {
            let total = seen.lock().unwrap().legit_total;
            async move { (total >= 4).then_some(()) }
        },
    )
    .await;
    (result, watch.finish().await)
}

const SLOW_LORIS_CAP: usize = 32;
const SLOW_LORIS_CLIENTS: usize = 96;

/// One slow-loris client: opens a connection, trickles header lines and never ends them; when
/// the operator closes it, opens another. Returns how many connections the operator closed.
async fn slow_loris(api: SocketAddr, until: Instant) -> usize {
    let mut closed_by_server = 0;
    while Instant::now() < until {
        let Ok(mut s) = tokio::net::TcpStream::connect(api).await else {
            continue;
        };
        if s.write_all(b"GET /api/webhooks HTTP/1.1\r\nHost: x\r\n")
            .await
            .is_err()
        {
            closed_by_server += 1;
            continue;
        }
        let mut i = 0;
        let closed = loop {
            if Instant::now() >= until {
                break false;
            }
            let mut byte = [0u8; 512];
            tokio::select! {
                read = s.read(&mut byte) => match read {
                    Ok(0) | Err(_) => break true,
                    // A 408 or similar, then the close.
                    Ok(_) => continue,
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
            i += 1;
            if s.write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                break true;
            }
        };
        if closed {
            closed_by_server += 1;
        }
    }
    closed_by_server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_past_the_connection_cap_leaves_the_api_serving() {
    let cap = SLOW_LORIS_CAP.to_string();
    let mut target = Target::start(
        "loris",
        "durable",
        &["--max-connections", &cap, "--header-read-timeout", "2s"],
    )
    .await;
    let rss_before = rss_mib(target.pid);
    let api = target.api();
    let until = Instant::now() + Duration::from_secs(20);
    let (closed, seen) = during(&target, async move {
        let clients = (0..SLOW_LORIS_CLIENTS).map(|_| tokio::spawn(slow_loris(api, until)));
        let mut closed = 0;
        for c in futures::future::join_all(clients).await {
            closed += c.unwrap();
        }
        closed
    })
    .await;
    let tenant_figures = target.tenant_figures(&seen).await;
    let rss_after = rss_mib(target.pid);
    figures(
        "slow_loris_past_the_connection_cap_leaves_the_api_serving",
        &tenant_figures,
        &seen,
        rss_before,
        rss_after,
        &format!(
            " max_connections={SLOW_LORIS_CAP} slow_clients={SLOW_LORIS_CLIENTS} closed_by_header_deadline={closed}"
        ),
    );
    assert!(target.alive());
    // Each slow client is cut off by the 2 s header deadline, so that the cap frees up.
    assert!(
        closed >= SLOW_LORIS_CLIENTS,
        "trickling connections were not closed: {closed}"
    );
    assert_eq!(seen.legit_refused, 0, "{seen:?}");
    assert_served_through(&seen, rss_before, 64.0);
}

const BOGUS_TOKENS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bogus_tokens_leave_the_api_serving() {
    let mut target = Target::start("bogus", "durable", &[]).await;
    let rss_before = rss_mib(target.pid);
    let api = target.api();
    let list = format!("http://{api}/api/webhooks?namespace={}", target.abuser_ns);
    let ((unauthorized, unavailable, other), seen) = during(&target, async move {
        let http = reqwest::Client::new();
        let answers = futures::stream::iter(0..BOGUS_TOKENS)
            .map(|i| {
                let request = http
                    .get(&list)
                    // Distinct and token-sized, as a flood of stolen-looking tokens would be.
                    .bearer_auth(format!("{i:08}.{}", "x".repeat(700)));
                async move {
                    let r = request.send().await.expect("the API answers");
                    let status = r.status().as_u16();
                    let retry = r.headers().contains_key("retry-after");
                    (status, retry)
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        let unauthorized = answers.iter().filter(|(s, _)| *s == 401).count();
        let unavailable = answers.iter().filter(|(s, r)| *s == 503 && *r).count();
        (
            unauthorized,
            unavailable,
            answers.len() - unauthorized - unavailable,
        )
    })
    .await;
    let tenant_figures = target.tenant_figures(&seen).await;
    let rss_after = rss_mib(target.pid);
    figures(
        "ten_thousand_bogus_tokens_leave_the_api_serving",
        &tenant_figures,
        &seen,
        rss_before,
        rss_after,
        &format!(" bogus={BOGUS_TOKENS} bogus_401={unauthorized} bogus_503={unavailable}"),
    );
    assert!(target.alive());
    assert_eq!(
        other, 0,
        "a bogus token got neither 401 nor 503 + Retry-After"
    );
    assert_eq!(seen.legit_refused, 0, "{seen:?}");
    assert_served_through(&seen, rss_before, 128.0);
}

/// `depth` arrays nested in one another, as the data of an event.
fn nested_arrays(depth: usize) -> String {
    format!(
        "{{\"event\":\"document.completed\",\"data\":{{\"k\":\"deep\",\"x\":{}{}}}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

/// `depth` objects nested in one another.
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_json_get_clear_refusals() {
    let mut target = Target::start("bigjson", "durable", &[]).await;
    let rss_before = rss_mib(target.pid);
    let api = target.api();
    let (ns, token) = (target.abuser_ns.clone(), target.abuser_token.clone());
    let (refusals, seen) = during(&target, async move {
        // A connection per request: the operator closes a connection after refusing an
        // oversized body, and a pooled connection reused just then would cut the next request
        // sent on it (a client-side race, not what this test is about).
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        // The token is reviewed once before the burst: 56 requests arriving with a token never
        // seen would queue for review slots, and one refused 503 before its body was read saw
        // its upload cut (a connection error), which is not what this test is about.
        let warm = http
            .get(format!("http://{api}/api/webhooks?namespace={ns}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("the API answers");
        assert_ne!(warm.status().as_u16(), 401, "the abuser's token is valid");
        // 2 MiB of valid events, twice the limit.
        let event =
            json!({"event": "document.completed", "data": {"k": "big", "pad": "p".repeat(2000)}});
        let big = Value::Array(vec![event; 1000]).to_string();
        assert!(big.len() > 2 * 1024 * 1024 - 100_000);
        let depth = 100_000;
        let cases: Vec<(&str, &str, String, u16)> = vec![
            ("POST", "/api/events", big.clone(), 413),
            ("POST", "/api/webhooks", big, 413),
            ("POST", "/api/events", nested_arrays(depth), 400),
            ("POST", "/api/events", nested_objects(depth), 400),
            // Never closed: the parser must stop at its depth limit, not at the end.
            ("POST", "/api/events", "[".repeat(500_000), 400),
            ("POST", "/api/webhooks", nested_objects(depth), 400),
            ("PUT", "/api/webhooks/sink", nested_arrays(depth), 400),
        ];
        // Each several times at once, as an abusive client would.
        futures::future::join_all(cases.iter().flat_map(|case| {
            let http = http.clone();
            let (ns, token) = (ns.clone(), token.clone());
            (0..8).map(move |_| {
                let (method, path, body, want) = case.clone();
                let request = http
                    .request(
                        method.parse().unwrap(),
                        format!("http://{api}{path}?namespace={ns}"),
                    )
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body);
                async move {
                    let r = request.send().await;
                    let (status, body) = match r {
                        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                        // The operator may close a connection after answering 413 before
                        // the whole body was sent.
                        Err(e) => (0, e.to_string()),
                    };
                    (method, path, want, status, body)
                }
            })
        }))
        .await
    })
    .await;
    let rss_after = rss_mib(target.pid);
    let mut messages = Vec::new();
    let mut answered = 0;
    for (method, path, want, status, body) in &refusals {
        if *status == 0 {
            // Only an oversized body may see its connection closed under it.
            assert_eq!(*want, 413, "{method} {path}: {body}");
            continue;
        }
        answered += 1;
        assert_eq!(status, want, "{method} {path}: {body}");
        let body: Value = serde_json::from_str(body).expect("a JSON error");
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        if *want == 413 {
            assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
            assert!(message.contains("1048576 bytes"), "{message}");
        } else {
            assert!(
                message.contains("nested more than 127 levels deep"),
                "{method} {path}: {message}"
            );
        }
        if !messages.contains(&message) {
            messages.push(message);
        }
    }
    let tenant_figures = target.tenant_figures(&seen).await;
    figures(
        "oversized_and_deeply_nested_json_get_clear_refusals",
        &tenant_figures,
        &seen,
        rss_before,
        rss_after,
        &format!(" hostile_requests={} answered={answered}", refusals.len()),
    );
    eprintln!("refusal messages: {messages:#?}");
    assert!(
        target.alive(),
        "the operator died: {}",
        target.op.log_text()
    );
    assert!(answered >= refusals.len() / 2, "{refusals:?}");
    assert_eq!(
        target.abuser_sink.counts("").0,
        0,
        "a refused event was delivered"
    );
    assert_eq!(seen.legit_refused, 0, "{seen:?}");
    assert_served_through(&seen, rss_before, 128.0);
}

/// The outcome of one batch request.
struct BatchAnswer {
    batch: usize,
    status: u16,
    body: Value,
    retry_after: bool,
}

/// `batches` requests of `BATCH` events at once from the abuser; then checks that every
/// accepted event is delivered as `mode` promises and no refused one is.
async fn concurrent_batches(test: &str, mode: &str, batches: usize, extra: &[&str]) {
    const BATCH: usize = 1000;
    let mut target = Target::start(&format!("batch-{mode}"), mode, extra).await;
    let rss_before = rss_mib(target.pid);
    let url = format!(
        "http://{}/api/events?namespace={}",
        target.api(),
        target.abuser_ns
    );
    let token = target.abuser_token.clone();
    let started = Instant::now();
    let (answers, seen) = during(&target, async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(170))
            .build()
            .unwrap();
        let requests = (0..batches).map(|batch| {
            let events: Vec<Value> = (0..BATCH)
                .map(|i| json!({"event": "document.completed", "data": {"k": format!("b{batch}-{i}"), "batch": batch, "i": i}}))
                .collect();
            let request = http
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(Value::Array(events).to_string());
            async move {
                let r = request.send().await.expect("the API answers");
                let status = r.status().as_u16();
                let retry_after = r.headers().contains_key("retry-after");
                let body = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
                BatchAnswer { batch, status, body, retry_after }
            }
        });
        futures::future::join_all(requests).await
    })
    .await;

    // What was accepted, event by event: a whole batch on 202, the "stored" ones of a
    // refusal that stored part of it.
    let mut accepted: Vec<String> = Vec::new();
    // Stores whose answer did not come in time: they may or may not be delivered.
    let mut unknown: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut refused_batches = 0;
    let mut refusal_codes: HashMap<String, usize> = HashMap::new();
    for a in &answers {
        match a.status {
            202 => {
                assert_eq!(a.body["accepted"], BATCH, "{}", a.body);
                accepted.extend((0..BATCH).map(|i| format!("b{}-{i}", a.batch)));
            }
            429 | 503 => {
                refused_batches += 1;
                assert!(
                    a.retry_after,
                    "a {} without Retry-After: {}",
                    a.status, a.body
                );
                let code = a.body["error"]["code"].as_str().expect("an error code");
                let message = a.body["error"]["message"].as_str().unwrap();
                assert!(message.contains("retry"), "{message}");
                *refusal_codes.entry(code.to_owned()).or_default() += 1;
                if let Some(stored) = a.body["error"]["stored"].as_array() {
                    accepted.extend(
                        stored
                            .iter()
                            .map(|s| format!("b{}-{}", a.batch, s["index"].as_u64().unwrap())),
                    );
                }
                if let Some(indices) = a.body["error"]["unknown"].as_array() {
                    unknown.extend(
                        indices
                            .iter()
                            .map(|i| format!("b{}-{}", a.batch, i.as_u64().unwrap())),
                    );
                }
            }
            other => panic!("batch {}: {other} {}", a.batch, a.body),
        }
    }
    let sink = target.abuser_sink.clone();
    let want = accepted.len();
    eventually(
        &format!("{want} accepted events of {mode} ingest delivered"),
        Duration::from_secs(170),
        || {
            let (distinct, _) = sink.counts("b");
            async move { (distinct >= want).then_some(()) }
        },
    )
    .await;
    let recover_s = started.elapsed().as_secs_f64();
    let delivered_legit = target.tenant_delivered(seen.legit_events_accepted).await;
    let rss_after = rss_mib(target.pid);
    let seen_keys = sink.seen.lock().unwrap().clone();
    let accepted_set: std::collections::HashSet<&String> = accepted.iter().collect();
    let lost = accepted
        .iter()
        .filter(|k| !seen_keys.contains_key(*k))
        .count();
    let unaccepted_delivered: Vec<&String> = seen_keys
        .keys()
        .filter(|k| k.starts_with('b') && !accepted_set.contains(k) && !unknown.contains(*k))
        .collect();
    let requests: usize = seen_keys
        .iter()
        .filter(|(k, _)| k.starts_with('b'))
        .map(|(_, n)| n)
        .sum();
    let distinct = seen_keys.keys().filter(|k| k.starts_with('b')).count();
    let duplicates = requests - distinct;
    figures(
        test,
        &format!(
            "sent={} delivered={} duplicates={duplicates} lost={lost} recover_s={recover_s:.1}",
            batches * BATCH,
            want - lost
        ),
        &seen,
        rss_before,
        rss_after,
        &format!(
            " mode={mode} batches={batches} accepted={want} unknown={} refused_batches={refused_batches} refusals={refusal_codes:?} legit_sent={} legit_delivered={delivered_legit}",
            unknown.len(),
            seen.legit_events_accepted
        ),
    );
    assert!(
        target.alive(),
        "the operator died: {}",
        target.op.log_text()
    );
    assert_eq!(lost, 0);
    assert!(
        unaccepted_delivered.is_empty(),
        "events of refused requests were delivered: {} (first {:?})",
        unaccepted_delivered.len(),
        unaccepted_delivered.first()
    );
    assert!(want > 0, "every batch was refused: {refusal_codes:?}");
    // Deliveries to a healthy receiver are retried only when an answer is lost in a
    // timeout: a few at most.
    assert!(
        duplicates <= want / 100,
        "{duplicates} duplicate deliveries"
    );
    assert_served_through(&seen, rss_before, 768.0);
    assert!(
        rss_after - rss_before < 384.0,
        "memory stayed at {rss_after:.1} MiB after the batches (from {rss_before:.1})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_batches_of_a_thousand_in_direct_mode() {
    concurrent_batches(
        "a_hundred_concurrent_batches_of_a_thousand_in_direct_mode",
        "direct",
        100,
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_batches_of_a_thousand_in_jetstream_mode() {
    concurrent_batches(
        "a_hundred_concurrent_batches_of_a_thousand_in_jetstream_mode",
        "jetstream",
        100,
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_batches_of_a_thousand_in_durable_mode() {
    concurrent_batches(
        "ten_concurrent_batches_of_a_thousand_in_durable_mode",
        "durable",
        10,
        &[],
    )
    .await;
}

/// Ten batches that cannot all be stored within the request timeout: each request stops
/// starting new stores half-way and says exactly which events it stored (503 with
/// Retry-After), instead of a 408 after storing an unknown part of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_batches_past_half_the_request_timeout_say_what_was_stored() {
    concurrent_batches(
        "durable_batches_past_half_the_request_timeout_say_what_was_stored",
        "durable",
        10,
        &["--request-timeout", "4s"],
    )
    .await;
}
