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
    EgressDenied, EgressPolicy, Signatures,
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
    /// The Webhook's own headers (`spec.headers`, `spec.headersFrom`).
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// Set when the Webhook names a Service (`spec.serviceRef`): `url` is then the URL derived
    /// from it, and the connection goes to exactly this Service's ClusterIP.
    pub service: Option<&'a ServiceTarget>,
}

/// A Service a Webhook names: its deliveries go to exactly its ClusterIP, the one private
/// address the egress policy lets through for it (named by the Webhook's author, in the
/// Webhook's own namespace), whatever `--allow-cidr` says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// `<service>.<namespace>.svc`: the URL's host, and the name the Service's certificate is
    /// checked against. Never looked up in DNS: it resolves to `cluster_ip` only.
    pub host: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// PEM CA certificates trusted (alone) for https; None: plain http.
    pub ca_bundle: Option<Arc<str>>,
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

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(32)
        .tcp_nodelay(true)
}

impl HttpSender {
    pub fn new(egress: EgressPolicy) -> Self {
        Self::with_address_map(egress, AddressMap::default())
    }

    /// `address_map` is the `--test-address-map` test seam.
    pub fn with_address_map(egress: EgressPolicy, address_map: AddressMap) -> Self {
        let egress = Arc::new(egress);
        let client = client_builder()
            .dns_resolver(GuardedResolver {
                egress: egress.clone(),
                address_map: address_map.clone(),
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
        let request = client
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
    address_map: AddressMap,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.egress.clone();
        let address_map = self.address_map.clone();
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
}
