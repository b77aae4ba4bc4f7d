//! Raw HTTP to the operator: minimal HTTP/1.1 GET and POST over loopback (no client library
//! between the test and the bytes, and `None` rather than a panic when nothing answers), JSON
//! calls to its REST API, `POST /api/events`, its /readyz, and samples of its /metrics.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;

/// A minimal HTTP/1.1 GET to a loopback server: (status code, body). None if not reachable.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A minimal HTTP/1.1 POST: status code, or None if unreachable.
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A JSON HTTP call to the operator's API: (status, parsed body or Null).
pub async fn api_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = req.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POSTs `body` (one event or an array of them) to `/api/events` in namespace `ns` without a
/// token, with an `Idempotency-Key` if `key` is given: (status, parsed reply or Null).
pub async fn post_events(
    addr: SocketAddr,
    ns: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/api/events?namespace={ns}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let response = req.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The /readyz status code at the operator's metrics address, None without an answer within
/// 5 s (refused connection, a process that is gone or frozen).
pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/readyz"))
        .await
        .ok()
        .flatten()
        .map(|(status, _)| status)
}

/// One sample of a series of an operator's /metrics, such as
/// `hookrelay_webhooks{state="Active"}`.
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The sum of every series of a counter family in an operator's /metrics, such as
/// `hookrelay_status_patches_total` over all its labels.
pub async fn metric_sum(addr: SocketAddr, family: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    Some(
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(family)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once('}')?.1,
                    None => rest,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum(),
    )
}

/// The sum of the series of `family` in an operator's /metrics whose labels include each of
/// `labels`, whatever their other labels: such as `hookrelay_delivery_attempts_total` with
/// `outcome="Succeeded"` in every namespace. None when no series has them.
pub async fn metric_with(addr: SocketAddr, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    let matching: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let (set, value) = l.strip_prefix(family)?.strip_prefix('{')?.split_once('}')?;
            let has =
                |(k, v): &(&str, &str)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\""));
            labels
                .iter()
                .all(has)
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}
