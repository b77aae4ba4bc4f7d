//! The one pooled HTTP client of every delivery, behind the egress guard.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header::{HeaderMap, HeaderName, HeaderValue},
    redirect,
};

use super::{
    EgressDenied, EgressPolicy,
    retry::{AttemptResult, parse_retry_after},
};
use crate::wire::{ServiceTarget, Signatures};

/// The user agent of every delivery.
pub const USER_AGENT: &str = concat!("hookrelay/", env!("CARGO_PKG_VERSION"));

/// Bytes of a response body read (so the connection can be reused) before it is dropped.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Bytes of a refusal's body kept in the attempt's record (`HTTP 500: <excerpt>`).
const EXCERPT_BYTES: usize = 256;

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
    /// The Webhook's own headers (`spec.headers`, `spec.headersFrom`).
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// Set when the Webhook names a Service (`spec.serviceRef`): `url` is then the URL derived
    /// from it, and the connection goes to exactly this Service's ClusterIP.
    pub service: Option<&'a ServiceTarget>,
}

/// TEST SEAM (`--test-address-map`, hidden): connect to another address than the one the egress
/// policy approved, for tests without kube-proxy (a Service's ClusterIP mapped onto a loopback
/// receiver) or without DNS. Applied after every egress decision, in one place
/// ([`AddressMap::connect_to`]), so the policy still judges the real address. Empty in
/// production; the operator warns loudly when it is not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressMap(Arc<Vec<(IpNet, IpAddr)>>);

impl AddressMap {
    pub fn new(pairs: impl IntoIterator<Item = (IpNet, IpAddr)>) -> Self {
        Self(Arc::new(pairs.into_iter().collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where a connection to `ip`, already allowed by the egress policy, really goes: the
    /// first mapping whose FROM covers it.
    pub fn connect_to(&self, ip: IpAddr) -> IpAddr {
        self.0
            .iter()
            .find(|(from, _)| from.contains(&ip))
            .map_or(ip, |(_, to)| *to)
    }

    /// Applies the map to a URL whose host is an IP literal (those never reach a resolver), after
    /// the egress policy judged the literal: the URL is pointed at TO and the returned `Host`
    /// value keeps the original authority, so the receiver sees the request as sent. None when
    /// the host is a name or no mapping covers it.
    pub fn redirect_literal(&self, url: &mut url::Url) -> Option<HeaderValue> {
        let ip = match url.host()? {
            url::Host::Ipv4(ip) => IpAddr::V4(ip),
            url::Host::Ipv6(ip) => IpAddr::V6(ip),
            url::Host::Domain(_) => return None,
        };
        let to = self.connect_to(ip);
        if to == ip {
            return None;
        }
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str()?),
            None => url.host_str()?.to_owned(),
        };
        url.set_ip_host(to).ok()?;
        HeaderValue::from_str(&authority).ok()
    }

    /// One `FROM=TO` pair of `--test-address-map`: FROM an address or a CIDR range (a test
    /// cannot know the ClusterIP a Service will get), TO an address.
    pub fn parse_pair(s: &str) -> Result<(IpNet, IpAddr), String> {
        let (from, to) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected FROM=TO, such as 10.0.0.0/24=127.0.0.1"))?;
        let from = from.trim();
        let from = from
            .parse::<IpNet>()
            .or_else(|_| from.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{from:?}: expected an IP address or a CIDR range"))?;
        let to = to
            .trim()
            .parse::<IpAddr>()
            .map_err(|e| format!("{to:?}: {e} (expected an IP address)"))?;
        Ok((from, to))
    }
}

/// TEST SEAM (`--test-resolve`, hidden): names answered by the test instead of the system
/// resolver, so a test can make a name resolve to any address (a blocked one, to prove the
/// connect-time check) without DNS. Consulted by [`GuardedResolver`] BEFORE the egress decision:
/// the policy judges the address given here exactly as it would judge one from DNS. Empty in
/// production; the operator warns loudly when it is not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestNames(Arc<Vec<(String, IpAddr)>>);

impl TestNames {
    pub fn new(pairs: impl IntoIterator<Item = (String, IpAddr)>) -> Self {
        Self(Arc::new(
            pairs
                .into_iter()
                .map(|(name, ip)| (normalize_name(&name), ip))
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every address given for `name` (a name may be given several), or None when the test
    /// gave none and the system resolver answers. Case and a trailing dot do not matter, as in
    /// DNS.
    pub fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        let name = normalize_name(name);
        let ips: Vec<IpAddr> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, ip)| *ip)
            .collect();
        (!ips.is_empty()).then_some(ips)
    }

    /// One `NAME=IP` pair of `--test-resolve`.
    pub fn parse_pair(s: &str) -> Result<(String, IpAddr), String> {
        let (name, ip) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=IP, such as rebind.test=10.0.0.1"))?;
        let name = name.trim();
        if name.is_empty() || name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{name:?}: expected a host name (addresses are mapped by --test-address-map)"
            ));
        }
        let ip = ip
            .trim()
            .parse::<IpAddr>()
            .map_err(|e| format!("{ip:?}: {e} (expected an IP address)"))?;
        Ok((name.to_owned(), ip))
    }
}

fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Clients for Services, by target: one per Service (and CA bundle) rather than one per
/// delivery, keeping its connection pool. Bounded: emptied when full (Services change rarely).
type ServiceClients = Arc<Mutex<HashMap<ServiceTarget, reqwest::Client>>>;
const MAX_SERVICE_CLIENTS: usize = 1024;

/// Sends attempts: keep-alive pool, no redirects, no proxies, every address checked.
#[derive(Clone)]
pub struct HttpSender {
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
    address_map: AddressMap,
    service_clients: ServiceClients,
}

/// Idle connections kept per endpoint: as many as attempts may be in flight to one namespace
/// by default (`--max-in-flight-per-namespace`), so that the connections a fan-out opened are
/// used again by the next one instead of closed and opened again.
const MAX_IDLE_PER_HOST: usize = 128;

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .tcp_nodelay(true)
}

impl HttpSender {
    pub fn new(egress: EgressPolicy) -> Self {
        Self::with_address_map(egress, AddressMap::default())
    }

    /// `address_map` is the `--test-address-map` test seam.
    pub fn with_address_map(egress: EgressPolicy, address_map: AddressMap) -> Self {
        Self::with_test_seams(egress, address_map, TestNames::default())
    }

    /// `address_map` and `test_names` are the `--test-address-map` and `--test-resolve` test
    /// seams.
    pub fn with_test_seams(
        egress: EgressPolicy,
        address_map: AddressMap,
        test_names: TestNames,
    ) -> Self {
        let egress = Arc::new(egress);
        let client = client_builder()
            .dns_resolver(GuardedResolver {
                egress: egress.clone(),
                address_map: address_map.clone(),
                test_names,
            })
            .build()
            .expect("the HTTP client configuration is valid");
        Self {
            client,
            egress,
            address_map,
            service_clients: Default::default(),
        }
    }

    /// The client of a Service target: resolves its host to its ClusterIP only, and trusts
    /// only its CA bundle.
    fn service_client(&self, target: &ServiceTarget) -> Result<reqwest::Client, String> {
        let mut clients = self
            .service_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(target) {
            return Ok(client.clone());
        }
        let mut builder = client_builder().dns_resolver(ServiceResolver {
            target: target.clone(),
            egress: self.egress.clone(),
            address_map: self.address_map.clone(),
        });
        if let Some(pem) = &target.ca_bundle {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("serviceRef.caBundle: {e}"))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("serviceRef.caBundle: {e}"))?;
        if clients.len() >= MAX_SERVICE_CLIENTS {
            clients.clear();
        }
        clients.insert(target.clone(), client.clone());
        Ok(client)
    }

    /// POSTs one attempt; returns how it ended and how long it took.
    pub async fn send(&self, attempt: Attempt<'_>) -> (AttemptResult, Duration) {
        let started = Instant::now();
        let not_sent = |message: String| {
            let result = AttemptResult::Error {
                message,
                permanent: false,
            };
            (result, started.elapsed())
        };
        let (client, url) = match attempt.service {
            // Literal addresses never reach the resolver: check them here. The URL parsed for
            // the check is the one sent (parsing it twice was a measurable part of an attempt).
            None => match self.egress.check_url(attempt.url) {
                Ok(url) => (self.client.clone(), url),
                Err(denied) => return not_sent(denied.to_string()),
            },
            // The URL was derived from the Service when the Webhook was resolved (its scheme
            // checked then); the Service's resolver checks the address.
            Some(target) => match (self.service_client(target), url::Url::parse(attempt.url)) {
                (Ok(client), Ok(url)) => (client, url),
                (Err(e), _) => return not_sent(e),
                (_, Err(e)) => {
                    return not_sent(EgressDenied::InvalidUrl(e.to_string()).to_string());
                }
            },
        };
        // Literal addresses skip the resolver, where the address map applies to names.
        let mut url = url;
        let literal_host = self.address_map.redirect_literal(&mut url);
        let mut headers = headers(&attempt);
        if let Some(host) = literal_host {
            headers.insert(reqwest::header::HOST, host);
        }
        let request = client
            .post(url)
            .headers(headers)
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
                let refused = !response.status().is_success();
                let excerpt = drain(response, if refused { EXCERPT_BYTES } else { 0 }).await;
                AttemptResult::Status {
                    code,
                    retry_after,
                    excerpt: refused.then(|| excerpt_text(&excerpt)).flatten(),
                }
            }
            Err(e) => AttemptResult::Error {
                message: describe(&e, attempt.timeout),
                permanent: false,
            },
        };
        (result, started.elapsed())
    }
}

/// The headers hookrelay sets, at most: sized up front, so that building them never grows the
/// map (its reallocations showed in the direct-mode profile).
const OWN_HEADERS: usize = 8;

fn headers(attempt: &Attempt<'_>) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(attempt.headers.len() + OWN_HEADERS);
    // The Webhook's own first: ours below replace any of the same name (none should be: the
    // reserved names are refused when the Webhook is resolved).
    for (name, value) in attempt.headers {
        h.insert(name.clone(), value.clone());
    }
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

/// Reads a bounded part of the body so the connection returns to the pool; returns its first
/// `keep` bytes.
async fn drain(mut response: reqwest::Response, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut read = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = keep.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
        read += chunk.len();
        if read > MAX_RESPONSE_BODY {
            break;
        }
    }
    kept
}

/// The start of a body as one line of text: invalid UTF-8 replaced, control characters and runs
/// of white space made one space. None when nothing is left. It is shown as text everywhere
/// (status, API, the web page), never interpreted.
fn excerpt_text(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let line = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!line.is_empty()).then_some(line)
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
    address_map: AddressMap,
    test_names: TestNames,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.egress.clone();
        let address_map = self.address_map.clone();
        let host = name.as_str().to_owned();
        let given = self.test_names.lookup(&host);
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = match given {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
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
                (false, _) => Ok(Box::new(
                    allowed
                        .into_iter()
                        .map(move |a| SocketAddr::new(address_map.connect_to(a.ip()), a.port())),
                ) as Addrs),
            }
        })
    }
}

/// Resolves the host of one Service target to its ClusterIP and nothing else (no DNS).
struct ServiceResolver {
    target: ServiceTarget,
    egress: Arc<EgressPolicy>,
    address_map: AddressMap,
}

impl Resolve for ServiceResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let target = &self.target;
        let result = if name.as_str() != target.host {
            Err(format!("{} is not the Service host {}", name.as_str(), target.host).into())
        } else {
            match self
                .egress
                .check_service_ip(target.cluster_ip, target.cluster_ip)
            {
                Ok(()) => {
                    let ip = self.address_map.connect_to(target.cluster_ip);
                    Ok(Box::new(std::iter::once(SocketAddr::new(ip, target.port))) as Addrs)
                }
                Err(e) => Err(e.to_string().into()),
            }
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_body_is_kept_as_one_line_of_text() {
        assert_eq!(
            excerpt_text(b"  quota\r\n exceeded:\t\x00<img src=x onerror=alert(1)>\n"),
            Some("quota exceeded: <img src=x onerror=alert(1)>".into())
        );
        assert_eq!(
            excerpt_text(b"bad \xff byte").as_deref(),
            Some("bad \u{fffd} byte")
        );
        assert_eq!(excerpt_text(b" \r\n\t"), None);
        assert_eq!(excerpt_text(b""), None);
    }

    #[test]
    fn the_test_address_map_parses_pairs_and_maps_only_what_it_names() {
        let pair = AddressMap::parse_pair("10.0.0.12=127.0.0.1").unwrap();
        let range = AddressMap::parse_pair("10.1.0.0/24=127.0.0.2").unwrap();
        let map = AddressMap::new([pair, range]);
        assert_eq!(
            map.connect_to("10.1.0.200".parse().unwrap()),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            map.connect_to("10.0.0.12".parse().unwrap()),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            map.connect_to("10.0.0.13".parse().unwrap()),
            "10.0.0.13".parse::<IpAddr>().unwrap()
        );
        assert!(AddressMap::parse_pair("10.0.0.12").is_err());
        assert!(AddressMap::parse_pair("10.0.0.12=localhost").is_err());
    }

    #[test]
    fn the_address_map_also_applies_to_literal_hosts_keeping_the_host_header() {
        let map = AddressMap::new([
            AddressMap::parse_pair("0.0.0.0/0=127.0.0.1").unwrap(),
            AddressMap::parse_pair("::/0=::1").unwrap(),
        ]);
        let mut url = url::Url::parse("http://10.0.0.1:8080/x?y=1").unwrap();
        let host = map.redirect_literal(&mut url).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/x?y=1");
        assert_eq!(host, "10.0.0.1:8080");
        let mut url = url::Url::parse("http://[fd00::1]:9/").unwrap();
        assert_eq!(map.redirect_literal(&mut url).unwrap(), "[fd00::1]:9");
        assert_eq!(url.as_str(), "http://[::1]:9/");
        // Default port: the Host header has none either.
        let mut url = url::Url::parse("https://169.254.169.254/latest").unwrap();
        assert_eq!(map.redirect_literal(&mut url).unwrap(), "169.254.169.254");
        assert_eq!(url.as_str(), "https://127.0.0.1/latest");
        // Names go through the resolver (mapped there); unmapped literals stay as they are.
        let mut url = url::Url::parse("http://example.com/").unwrap();
        assert_eq!(map.redirect_literal(&mut url), None);
        let mut url = url::Url::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(map.redirect_literal(&mut url), None);
        assert_eq!(url.as_str(), "http://127.0.0.1:9/");
        let mut url = url::Url::parse("http://10.0.0.1/").unwrap();
        assert_eq!(AddressMap::default().redirect_literal(&mut url), None);
    }

    #[test]
    fn the_test_resolver_parses_pairs_and_answers_only_its_names() {
        let names = TestNames::new([
            TestNames::parse_pair("Rebind.Test=10.0.0.1").unwrap(),
            TestNames::parse_pair("rebind.test.=::1").unwrap(),
            TestNames::parse_pair("other.test=127.0.0.1").unwrap(),
        ]);
        let both: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        assert_eq!(names.lookup("rebind.test"), Some(both.clone()));
        assert_eq!(names.lookup("REBIND.TEST."), Some(both));
        assert_eq!(names.lookup("example.com"), None);
        assert!(TestNames::default().is_empty());
        assert!(TestNames::parse_pair("rebind.test").is_err());
        assert!(TestNames::parse_pair("rebind.test=localhost").is_err());
        assert!(TestNames::parse_pair("10.0.0.1=127.0.0.1").is_err());
        assert!(TestNames::parse_pair("=127.0.0.1").is_err());
    }

    fn guarded(policy: EgressPolicy, map: &[&str], names: &[&str]) -> GuardedResolver {
        GuardedResolver {
            egress: Arc::new(policy),
            address_map: AddressMap::new(map.iter().map(|p| AddressMap::parse_pair(p).unwrap())),
            test_names: TestNames::new(names.iter().map(|p| TestNames::parse_pair(p).unwrap())),
        }
    }

    async fn resolve(resolver: &GuardedResolver, name: &str) -> Result<Vec<SocketAddr>, String> {
        resolver
            .resolve(name.parse().unwrap())
            .await
            .map(|addrs| addrs.collect())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_guarded_resolver_judges_the_test_resolvers_answer_like_dns() {
        // No connection is made: only the resolver's answer is looked at.
        let resolver = guarded(
            EgressPolicy::new(true, vec![]),
            &["0.0.0.0/0=127.0.0.1"],
            &[
                "rebind.test=10.0.0.1",
                "metadata.test=169.254.169.254",
                "mixed.test=10.0.0.2",
                "mixed.test=93.184.216.34",
                "public.test=93.184.216.34",
            ],
        );
        let refused = resolve(&resolver, "rebind.test").await.unwrap_err();
        assert!(
            refused.contains("resolves only to refused addresses") && refused.contains("private"),
            "{refused}"
        );
        let refused = resolve(&resolver, "metadata.test").await.unwrap_err();
        assert!(refused.contains("link-local"), "{refused}");
        // Allowed addresses are kept (then mapped, after the decision); blocked ones dropped.
        let expected: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap()];
        assert_eq!(resolve(&resolver, "mixed.test").await.unwrap(), expected);
        assert_eq!(resolve(&resolver, "public.test").await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_literal_host_is_mapped_onto_the_test_receiver() {
        // Loopback only: 127.0.0.2 is allowed and mapped onto a receiver on 127.0.0.1.
        let (host_tx, mut host_rx) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let host = headers.get("host").map(|h| h.to_str().unwrap().to_owned());
                let _ = host_tx.send(host);
                async { "ok" }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        // reqwest is built without a default TLS provider (the binary installs ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sender = HttpSender::with_address_map(
            EgressPolicy::new(true, vec!["127.0.0.2/32".parse().unwrap()]),
            AddressMap::new([AddressMap::parse_pair("127.0.0.2=127.0.0.1").unwrap()]),
        );
        let url = format!("http://127.0.0.2:{port}/h");
        let (result, _) = sender
            .send(Attempt {
                url: &url,
                event: "document.completed",
                delivery_id: "d1",
                timestamp: 0,
                signatures: Signatures {
                    hex: "00".into(),
                    standard: None,
                },
                body: bytes::Bytes::from_static(b"{}"),
                timeout: Duration::from_secs(10),
                traceparent: None,
                headers: &[],
                service: None,
            })
            .await;
        assert!(
            matches!(result, AttemptResult::Status { code: 200, .. }),
            "{result:?}"
        );
        assert_eq!(
            host_rx.recv().await.unwrap().as_deref(),
            Some(format!("127.0.0.2:{port}").as_str())
        );
    }
}
