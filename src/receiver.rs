//! `hookrelay receive`: a webhook receiver that checks every delivery's signatures with the
//! Webhook's secret and prints one JSON line per request. For a first Webhook (the README's
//! quick start runs it as a Deployment) and for looking at what a Webhook sends; a receiver of
//! your own verifies the same way (see docs/receiving.md).

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    routing::get,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::wire::Signer;

/// How far a Standard Webhooks `webhook-timestamp` may be from now (the specification's
/// suggestion): an older attempt is a replay.
const TIMESTAMP_TOLERANCE_SECONDS: i64 = 300;

/// Serves until `shutdown`: POST anywhere is a delivery, `GET /healthz` answers ok.
pub async fn serve(
    listener: tokio::net::TcpListener,
    signer: Signer,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(receive)
        .with_state(Arc::new(signer));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn receive(
    State(signer): State<Arc<Signer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "deliveries are POSTs\n");
    }
    let line = check(&signer, uri.path(), &headers, &body, unix_now());
    println!("{line}");
    if line["verified"] == true {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::UNAUTHORIZED, "signature not valid\n")
    }
}

/// The line printed for one request, with `verified`: every signature it carries is valid and
/// its Standard Webhooks timestamp (if any) is recent.
fn check(signer: &Signer, path: &str, headers: &HeaderMap, body: &[u8], now: i64) -> Value {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let standard = header("webhook-signature").map(|signature| {
        (
            signature,
            header("webhook-id").unwrap_or_default(),
            header("webhook-timestamp").unwrap_or_default(),
        )
    });
    let verified = signer.verify(body, header("x-webhook-signature"), standard);
    let recent = header("webhook-timestamp").map(|t| {
        t.parse::<i64>()
            .is_ok_and(|t| (now - t).abs() <= TIMESTAMP_TOLERANCE_SECONDS)
    });
    let body = serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    json!({
        "verified": verified.ok() && recent != Some(false),
        "path": path,
        "delivery": header("x-webhook-delivery"),
        "event": header("x-webhook-event"),
        "x_webhook_signature": verified.hex,
        "webhook_signature": verified.standard,
        "timestamp_recent": recent,
        "body": body,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const BODY: &[u8] = br#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123}}"#;
    const NOW: i64 = 1_700_000_000;

    fn headers(hex: &str, standard: Option<&str>, timestamp: i64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-webhook-signature", hex.parse().unwrap());
        h.insert("x-webhook-delivery", "d-1".parse().unwrap());
        h.insert("x-webhook-event", "document.completed".parse().unwrap());
        if let Some(standard) = standard {
            h.insert("webhook-signature", standard.parse().unwrap());
            h.insert("webhook-id", "d-1".parse().unwrap());
            h.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        }
        h
    }

    #[test]
    fn a_signed_delivery_verifies_and_is_printed_with_its_body() {
        let signer = Signer::new(SECRET, None).unwrap();
        let sigs = signer.sign("d-1", NOW, BODY);
        let line = check(
            &signer,
            "/hooks",
            &headers(&sigs.hex, sigs.standard.as_deref(), NOW),
            BODY,
            NOW + 10,
        );
        assert_eq!(line["verified"], true, "{line}");
        assert_eq!(line["webhook_signature"], true);
        assert_eq!(line["delivery"], "d-1");
        assert_eq!(line["body"]["data"]["document_id"], 123);
    }

    #[test]
    fn a_wrong_signature_or_an_old_timestamp_is_not_verified() {
        let signer = Signer::new(SECRET, None).unwrap();
        let sigs = signer.sign("d-1", NOW, BODY);
        let wrong = check(
            &signer,
            "/",
            &headers(&"0".repeat(64), None, NOW),
            BODY,
            NOW,
        );
        assert_eq!(wrong["verified"], false, "{wrong}");
        let replayed = check(
            &signer,
            "/",
            &headers(&sigs.hex, sigs.standard.as_deref(), NOW),
            BODY,
            NOW + 3600,
        );
        assert_eq!(replayed["verified"], false, "{replayed}");
        assert_eq!(replayed["timestamp_recent"], false);
        let tampered = check(
            &signer,
            "/",
            &headers(&sigs.hex, sigs.standard.as_deref(), NOW),
            b"{}",
            NOW,
        );
        assert_eq!(tampered["verified"], false);
        assert_eq!(tampered["body"], json!({}));
    }
}
