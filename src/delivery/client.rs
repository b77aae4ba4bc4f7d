//! The one pooled HTTP client of every delivery, behind the egress guard.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header::{HeaderMap, HeaderName, HeaderValue},
    redirect,
};

use super::{
    EgressPolicy, Signatures,
    retry::{AttemptResult, parse_retry_after},
};

/// The user agent of every delivery.
pub const USER_AGENT: &str = concat!("hookrelay/", env!("CARGO_PKG_VERSION"));

/// Bytes of a response body read (so the connection can be reused) before it is dropped.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// One attempt to POST.
pub struct Attempt<'a> {
    pub url: &'a str,
    pub event: &'a str,
    pub delivery_id: &'a str,
    /// Unix seconds of this attempt, as signed.
    pub timestamp: i64,
    pub signatures: Signatures,
    pub body: bytes::Bytes,
    pub timeout: Duration,
    /// The W3C `traceparent` of the attempt's span, when traces are exported.
    pub traceparent: Option<String>,
}

/// Sends attempts: keep-alive pool, no redirects, no proxies, every address checked.
#[derive(Clone)]
pub struct HttpSender {
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
}

impl HttpSender {
    pub fn new(egress: EgressPolicy) -> Self {
        let egress = Arc::new(egress);
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver {
                egress: egress.clone(),
            })
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .build()
            .expect("the HTTP client configuration is valid");
        Self { client, egress }
    }

    /// POSTs one attempt; returns how it ended and how long it took.
    pub async fn send(&self, attempt: Attempt<'_>) -> (AttemptResult, Duration) {
        let started = Instant::now();
        // Literal addresses never reach the resolver: check them here. The URL parsed for the
        // check is the one sent (parsing it twice was a measurable part of an attempt).
        let url = match self.egress.check_url(attempt.url) {
            Ok(url) => url,
            Err(denied) => {
                let result = AttemptResult::Error {
                    message: denied.to_string(),
                    permanent: false,
                };
                return (result, started.elapsed());
            }
        };
        let request = self
            .client
            .post(url)
            .headers(headers(&attempt))
            .body(attempt.body)
            .timeout(attempt.timeout);
        let result = match request.send().await {
            Ok(response) => {
                let code = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                drain(response).await;
                AttemptResult::Status { code, retry_after }
            }
            Err(e) => AttemptResult::Error {
                message: describe(&e, attempt.timeout),
                permanent: false,
            },
        };
        (result, started.elapsed())
    }
}

fn headers(attempt: &Attempt<'_>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("content-type", "application/json");
    put("x-webhook-signature", &attempt.signatures.hex);
    put("x-webhook-event", attempt.event);
    put("x-webhook-delivery", attempt.delivery_id);
    if let Some(standard) = &attempt.signatures.standard {
        put("webhook-id", attempt.delivery_id);
        put("webhook-timestamp", &attempt.timestamp.to_string());
        put("webhook-signature", standard);
    }
    if let Some(traceparent) = &attempt.traceparent {
        put("traceparent", traceparent);
    }
    h
}

/// Reads a bounded part of the body so the connection returns to the pool.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        if read > MAX_RESPONSE_BODY {
            break;
        }
    }
}

/// A short, secret-free description of a failed request.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {}s", timeout.as_secs());
    }
    let mut message = if e.is_connect() {
        "connect failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Resolves names and keeps only the addresses the egress policy allows, so a name cannot be
/// (re)bound to a blocked address: the connection goes only to what was checked here.
struct GuardedResolver {
    egress: Arc<EgressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut denied = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match egress.check_ip(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        denied = Some(e);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), denied) {
                (true, Some(e)) => {
                    Err(format!("{host} resolves only to refused addresses: {e}").into())
                }
                (true, None) => Err(format!("{host} did not resolve").into()),
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}
