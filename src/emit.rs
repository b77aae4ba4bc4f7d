//! `hookrelay emit`: sends events to the ingest API (`POST /api/v1/events`) with a bearer token
//! read from a file, for a Job, a CronJob or a sidecar of a producer in the cluster. The token is
//! read for each request, so a projected ServiceAccount token the kubelet rotates is picked up.
//! Refusals for lack of room (429, 503) and lost connections are retried after `Retry-After`;
//! any other refusal is reported at once with the API's problem details.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

/// What to send, where, and as whom.
#[derive(Debug, Clone)]
pub struct Emit {
    /// hookrelay's API, such as `http://hookrelay.hookrelay.svc:8080`.
    pub api_url: String,
    /// The namespace whose Webhooks receive the events; None: the token's ServiceAccount's.
    pub namespace: Option<String>,
    pub token_file: PathBuf,
    pub idempotency_key: Option<String>,
    /// One event object or an array of them, as the API takes them.
    pub body: String,
    /// Attempts after the first, for refusals worth retrying.
    pub retries: u32,
    pub timeout: Duration,
    /// PEM CA certificates for an https API; None: the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// The longest wait between attempts, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("{0}")]
    Setup(String),
    #[error("the API refused the events ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("the API could not be reached after {attempts} attempts: {last}")]
    Unreachable { attempts: u32, last: String },
}

/// Sends the events; the API's answer (what was accepted) on success.
pub async fn emit(e: &Emit) -> Result<Value, EmitError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events: Value = serde_json::from_str(&e.body)
        .map_err(|err| EmitError::Setup(format!("the events are not JSON: {err}")))?;
    let mut client = reqwest::Client::builder()
        .timeout(e.timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca_file) = &e.ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|err| EmitError::Setup(format!("{}: {err}", ca_file.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| EmitError::Setup(format!("{}: {err}", ca_file.display())))?;
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    let client = client
        .build()
        .map_err(|err| EmitError::Setup(err.to_string()))?;
    let mut url = url::Url::parse(&format!(
        "{}/api/v1/events",
        e.api_url.trim_end_matches('/')
    ))
    .map_err(|err| EmitError::Setup(format!("--api-url {}: {err}", e.api_url)))?;
    if let Some(namespace) = &e.namespace {
        url.query_pairs_mut().append_pair("namespace", namespace);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let token = std::fs::read_to_string(&e.token_file).map_err(|err| {
            EmitError::Setup(format!("the token file {}: {err}", e.token_file.display()))
        })?;
        let mut request = client
            .post(url.clone())
            .bearer_auth(token.trim())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(events.to_string());
        if let Some(key) = &e.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let (retry, wait, failure) = match request.send().await {
            Ok(reply) if reply.status().is_success() => {
                let text = reply.text().await.map_err(|err| EmitError::Unreachable {
                    attempts: attempt,
                    last: format!("the answer was cut: {err}"),
                })?;
                return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)));
            }
            Ok(reply) => {
                let status = reply.status().as_u16();
                let wait = reply
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .map(Duration::from_secs);
                let text = reply.text().await.unwrap_or_default();
                let detail = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|p| {
                        let detail = p.get("detail")?.as_str()?.to_owned();
                        Some(match p.get("code").and_then(Value::as_str) {
                            Some(code) => format!("{code}: {detail}"),
                            None => detail,
                        })
                    })
                    .unwrap_or(text);
                let failure = EmitError::Refused { status, detail };
                (matches!(status, 429 | 503), wait, failure)
            }
            // Nothing was answered: with an idempotency key a retry stores nothing twice.
            Err(err) => (
                true,
                None,
                EmitError::Unreachable {
                    attempts: attempt,
                    last: err.to_string(),
                },
            ),
        };
        if !retry || attempt > e.retries {
            return Err(match failure {
                EmitError::Unreachable { last, .. } => EmitError::Unreachable {
                    attempts: attempt,
                    last,
                },
                other => other,
            });
        }
        let backoff = Duration::from_millis(250 << attempt.min(7));
        tokio::time::sleep(wait.unwrap_or(backoff).min(MAX_WAIT)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::{
        Router,
        extract::{Query, State},
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::post,
    };

    use super::*;

    /// What one request carried: its Authorization, Idempotency-Key, `?namespace=` and body.
    struct Request {
        authorization: Option<String>,
        key: Option<String>,
        namespace: Option<String>,
        body: Value,
    }

    #[derive(Default)]
    struct Seen {
        requests: Vec<Request>,
    }

    type Answers = Arc<Mutex<std::vec::IntoIter<(u16, &'static str)>>>;

    /// An API that answers `answers` in turn, recording what each request carried.
    async fn api(answers: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        let app = Router::new()
            .route(
                "/api/v1/events",
                post(
                    |State((seen, answers)): State<(Arc<Mutex<Seen>>, Answers)>,
                     Query(q): Query<std::collections::HashMap<String, String>>,
                     headers: HeaderMap,
                     body: axum::body::Bytes| async move {
                        let header = |n: header::HeaderName| {
                            headers.get(n).map(|v| v.to_str().unwrap().to_owned())
                        };
                        seen.lock().unwrap().requests.push(Request {
                            authorization: header(header::AUTHORIZATION),
                            key: headers
                                .get("idempotency-key")
                                .map(|v| v.to_str().unwrap().to_owned()),
                            namespace: q.get("namespace").cloned(),
                            body: serde_json::from_slice(&body).unwrap(),
                        });
                        let (status, body) = answers.lock().unwrap().next().unwrap();
                        (
                            StatusCode::from_u16(status).unwrap(),
                            [(header::RETRY_AFTER, "0")],
                            body,
                        )
                            .into_response()
                    },
                ),
            )
            .with_state((seen.clone(), answers));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/"), seen)
    }

    fn emit_to(url: &str, token_file: PathBuf, body: &str) -> Emit {
        Emit {
            api_url: url.to_owned(),
            namespace: Some("docs".into()),
            token_file,
            idempotency_key: Some("doc-1-uploaded".into()),
            body: body.to_owned(),
            retries: 3,
            timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }

    /// A token file, removed when dropped.
    struct TokenFile(PathBuf);

    fn token_file(token: &str) -> TokenFile {
        let path = std::env::temp_dir().join(format!(
            "hookrelay-emit-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        TokenFile(path)
    }

    impl Drop for TokenFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[tokio::test]
    async fn a_refusal_for_lack_of_room_is_retried_with_the_same_key_and_token() {
        let (url, seen) = api(vec![
            (503, r#"{"code":"queue_full","detail":"full"}"#),
            (202, r#"{"mode":"durable","accepted":1}"#),
        ])
        .await;
        let token = token_file("t0k3n");
        let body = r#"{"event":"document.uploaded","data":{"document_id":1}}"#;
        let accepted = emit(&emit_to(&url, token.0.clone(), body)).await.unwrap();
        assert_eq!(accepted["accepted"], 1);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 2);
        for r in &seen.requests {
            assert_eq!(r.authorization.as_deref(), Some("Bearer t0k3n"));
            assert_eq!(r.key.as_deref(), Some("doc-1-uploaded"));
            assert_eq!(r.namespace.as_deref(), Some("docs"));
            assert_eq!(r.body, serde_json::from_str::<Value>(body).unwrap());
        }
    }

    #[tokio::test]
    async fn another_refusal_is_reported_at_once_with_the_problem() {
        let (url, seen) = api(vec![(
            422,
            r#"{"type":"https://hookrelay.dev/problems/invalid","code":"invalid","detail":"unknown event type document.done"}"#,
        )])
        .await;
        let token = token_file("t");
        let error = emit(&emit_to(
            &url,
            token.0.clone(),
            r#"{"event":"document.done","data":{}}"#,
        ))
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the API refused the events (422): invalid: unknown event type document.done"
        );
        assert_eq!(seen.lock().unwrap().requests.len(), 1);
    }

    #[tokio::test]
    async fn bad_input_fails_before_anything_is_sent() {
        let (url, seen) = api(vec![]).await;
        let token = token_file("t");
        let error = emit(&emit_to(&url, token.0.clone(), "{not json"))
            .await
            .unwrap_err();
        assert!(
            error.to_string().starts_with("the events are not JSON"),
            "{error}"
        );
        let missing = emit(&emit_to(&url, "/nonexistent/token".into(), "{}"))
            .await
            .unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/token"),
            "{missing}"
        );
        assert!(seen.lock().unwrap().requests.is_empty());
    }
}
