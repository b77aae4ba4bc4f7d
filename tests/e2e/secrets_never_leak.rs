//! Secrets never leak: a full flow against the real binary (auth on, every crate
//! logging at debug), then a search of everything the operator wrote for the secret values.
//!
//! The corpus is the operator's whole log, the namespace's Kubernetes Events, every Webhook and
//! DocumentEvent (status included), every API reply but the two that hand out a secret (the
//! creation reply and the rotate-secret reply, which returns the new secret once the same way),
//! the /metrics text and, in JetStream mode, every message of the stream. Secret objects are
//! the secrets' home, not operator output: they are not collected (`kubectl get secrets` is
//! never part of the corpus).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::support::{
    NatsServer, OperatorArgs, api_call, control_plane, create_event, eventually, http_get,
    wait_ready_reason,
};

const WAIT: Duration = Duration::from_secs(90);

/// What a failing receiver answers with (hookrelay records `HTTP 500: ` and this text).
const FAILURE_TEXT: &str = "receiver failure: the document store is read-only";

/// The forms a secret takes when it leaks: as written, as Secret data (base64), JSON-escaped,
/// hex, its bytes as Rust's Debug prints them (a `ByteString` or `Vec<u8>` in a debug line),
/// percent-encoded; for a `whsec_` secret also the same forms of the key bytes it encodes.
fn leak_forms(secret: &str) -> Vec<(String, String)> {
    let mut forms = Vec::new();
    let mut add_bytes = |what: &str, bytes: &[u8]| {
        let decimal: Vec<String> = bytes.iter().map(u8::to_string).collect();
        forms.extend([
            (format!("{what} as base64"), STANDARD_NO_PAD.encode(bytes)),
            (
                format!("{what} as url-safe base64"),
                URL_SAFE_NO_PAD.encode(bytes),
            ),
            (format!("{what} as hex"), hex::encode(bytes)),
            (format!("{what} as HEX"), hex::encode_upper(bytes)),
            (format!("{what} as debug bytes"), decimal.join(", ")),
            (format!("{what} as a JSON byte array"), decimal.join(",")),
        ]);
    };
    add_bytes("value", secret.as_bytes());
    if let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
    {
        add_bytes("key", &key);
    }
    let json = serde_json::to_string(secret).unwrap();
    let json = json.trim_matches('"').to_owned();
    let percent: String = secret
        .chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || "-_.~".contains(c) => c.to_string(),
            c => format!("%{:02X}", c as u32),
        })
        .collect();
    forms.extend([
        ("value".to_owned(), secret.to_owned()),
        ("value JSON-escaped".to_owned(), json.clone()),
        (
            "value JSON-escaped with \\/".to_owned(),
            json.replace('/', "\\/"),
        ),
        ("value percent-encoded".to_owned(), percent.clone()),
        (
            "value percent-encoded (lowercase)".to_owned(),
            percent.to_lowercase(),
        ),
    ]);
    forms.sort_by(|a, b| a.1.cmp(&b.1));
    forms.dedup_by(|a, b| a.1 == b.1);
    forms
}

/// Every occurrence of any form of any secret in the corpus: "source: secret (form)".
fn find_leaks(corpus: &[(String, String)], secrets: &[(&str, &str)]) -> Vec<String> {
    let mut hits = Vec::new();
    for (label, secret) in secrets {
        for (form, needle) in leak_forms(secret) {
            for (source, text) in corpus {
                if text.contains(&needle) {
                    hits.push(format!("{source}: {label} ({form})"));
                }
            }
        }
    }
    hits
}

/// One request the receiver got: everything on the wire but the request line.
#[derive(Clone, Debug)]
struct Request {
    delivery_id: String,
    answered: u16,
    /// Whether `X-Webhook-Signature` is the HMAC of the body under the secret in force.
    signature_ok: bool,
    headers: String,
    body: String,
}

/// A loopback receiver that records every request and answers 200, or 500 with
/// [`FAILURE_TEXT`] while failing; it checks the contract's signature with the secret it is told.
#[derive(Clone, Default)]
struct Recorder {
    requests: Arc<Mutex<Vec<Request>>>,
    failing: Arc<Mutex<bool>>,
    secret: Arc<Mutex<String>>,
}

impl Recorder {
    async fn start() -> (Recorder, SocketAddr) {
        let recorder = Recorder::default();
        let r = recorder.clone();
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let r = r.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let mut mac =
                        Hmac::<sha2::Sha256>::new_from_slice(r.secret.lock().unwrap().as_bytes())
                            .unwrap();
                    mac.update(&body);
                    let signature_ok =
                        hex::encode(mac.finalize().into_bytes()) == header("x-webhook-signature");
                    let failing = *r.failing.lock().unwrap();
                    let answered = if failing { 500 } else { 200 };
                    r.requests.lock().unwrap().push(Request {
                        delivery_id: header("x-webhook-delivery"),
                        answered,
                        signature_ok,
                        headers: format!("{headers:?}"),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                    let status = axum::http::StatusCode::from_u16(answered).unwrap();
                    (status, if failing { FAILURE_TEXT } else { "ok" })
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (recorder, addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn set(&self, failing: bool, secret: &str) {
        *self.failing.lock().unwrap() = failing;
        *self.secret.lock().unwrap() = secret.to_owned();
    }

    /// Distinct delivery ids answered 200.
    fn delivered(&self) -> std::collections::BTreeSet<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.delivery_id)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_in_anything_the_operator_writes() {
    full_flow(
        "no_secret_value_appears_in_anything_the_operator_writes",
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_in_anything_the_operator_writes_in_jetstream_mode() {
    let nats = NatsServer::start().await;
    full_flow(
        "no_secret_value_appears_in_anything_the_operator_writes_in_jetstream_mode",
        Some(&nats),
    )
    .await
}

/// Every message of the operator's JetStream stream: subject, headers and payload.
async fn stream_messages(nats: &NatsServer) -> String {
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("HOOKRELAY")
        .await
        .unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut text = String::new();
    for seq in state.first_sequence..=state.last_sequence {
        // Deleted or expired sequences have no message.
        if let Ok(m) = stream.get_raw_message(seq).await {
            text.push_str(&format!(
                "{} {:?} {}\n",
                m.subject,
                m.headers,
                String::from_utf8_lossy(&m.payload)
            ));
        }
    }
    text
}

/// The flow (durable ingest, or JetStream with `nats`), then the search.
async fn full_flow(name: &str, nats: Option<&NatsServer>) {
    let test = format!("secrets_never_leak::{name}");
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("leak").await;
    let token = control_plane().hookrelay_token(&ns, "leak-test").await;
    // The real binary, auth on (TokenReview + SubjectAccessReview), every crate at debug:
    // kube, hyper, reqwest and rustls lines are in the log too (asserted below).
    let mut args = OperatorArgs::new(&ns)
        .with_auth()
        // Keep every DocumentEvent: they are part of what is searched, and recover needs
        // the failed ones.
        .arg("--event-retention", "0")
        .arg("--failed-event-retention", "0")
        .env("RUST_LOG", "debug");
    if let Some(nats) = nats {
        args = args.mode("jetstream").nats(&nats.url);
    }
    let op = args.start(cp);
    op.wait_ready().await;
    let api = op.listen_addr;
    // Every reply but the two that hand out a secret goes into the corpus.
    let mut replies: Vec<(String, String)> = Vec::new();
    let mut call = async |what: &str, method: &str, path: String, body: Option<Value>| {
        let body = body.map(|b| b.to_string());
        let (code, reply) = api_call(api, method, &path, Some(&token), body.as_deref()).await;
        replies.push((format!("reply to {what}"), reply.to_string()));
        (code, reply)
    };

    let (receiver, addr) = Recorder::start().await;
    let (code, created) = api_call(
        api,
        "POST",
        &format!("/api/webhooks?namespace={ns}"),
        Some(&token),
        Some(
            &json!({"url": format!("http://{addr}/hooks"), "events": ["*"],
                    "description": "secrets never leak"})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let old_secret = created["secret"].as_str().unwrap().to_owned();
    receiver.set(false, &old_secret);

    // A secret header value too (headersFrom): sent to the receiver, never written elsewhere.
    let header_value = format!("Bearer {}", hex::encode(rand::random::<[u8; 24]>()));
    let header_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hooks-auth", "labels": {"hookrelay.dev/webhook-headers": "true"}},
        "stringData": {"Authorization": header_value},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &header_secret)
        .await
        .unwrap();
    // Short retries, so that failures become final (for recover) within the test.
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), &ns);
    webhooks
        .patch(
            &id,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "delivery": {"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1},
                "headersFrom": {"secretRef": {"name": "hooks-auth"}},
            }})),
        )
        .await
        .unwrap();
    wait_ready_reason(&client, &ns, &id, "True", "Routed").await;

    let mut sent = 0usize;
    // 1. Deliveries signed with the generated secret.
    let (code, reply) = call(
        "ingest",
        "POST",
        format!("/api/events?namespace={ns}"),
        Some(Value::Array(
            (0..3)
                .map(|d| json!({"event": "document.completed", "data": {"document_id": d}}))
                .collect(),
        )),
    )
    .await;
    assert_eq!(code, 202, "{reply}");
    sent += 3;
    eventually(
        "3 deliveries signed with the first secret",
        WAIT,
        || async {
            let ok = receiver
                .requests()
                .iter()
                .filter(|r| r.answered == 200 && r.signature_ok)
                .count();
            (ok >= 3).then_some(())
        },
    )
    .await;

    // 2. Rotation: its reply hands out the new secret once, like creation, so it is left out.
    let (code, rotated) = api_call(
        api,
        "POST",
        &format!("/api/webhooks/{id}/rotate-secret?namespace={ns}&graceSeconds=5"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(code, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, old_secret);
    // The grace period ends and the leader removes `previous` (a path that logs).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    eventually("previous removed after the grace period", WAIT, || async {
        let s = secrets.get(&format!("{id}-secret")).await.ok()?;
        (!s.data.unwrap_or_default().contains_key("previous")).then_some(())
    })
    .await;

    // 3. Failures with an error text, signed with the new secret, until final.
    receiver.set(true, &new_secret);
    let (code, reply) = call(
        "ingest while failing",
        "POST",
        format!("/api/events?namespace={ns}"),
        Some(Value::Array(
            (10..13)
                .map(|d| json!({"event": "document.error", "data": {"document_id": d}}))
                .collect(),
        )),
    )
    .await;
    assert_eq!(code, 202, "{reply}");
    sent += 3;
    // One event as a DocumentEvent of its own (in JetStream mode too), whose delivery can be
    // sent again: redeliver needs the stored event.
    create_event(
        &client,
        &ns,
        "doc-leak-failing",
        "document.error",
        json!({"document_id": 13}),
    )
    .await;
    sent += 1;
    let failed_id = eventually("the 4 deliveries failed for good", WAIT, || async {
        let w = webhooks.get(&id).await.ok()?;
        let failed: Vec<_> = w
            .status?
            .recent_deliveries
            .into_iter()
            .filter(|r| r.outcome == hookrelay::crd::Outcome::Failed)
            .collect();
        let ids: std::collections::BTreeSet<&str> = failed.iter().map(|r| r.id.as_str()).collect();
        (ids.len() >= 4).then_some(())?;
        failed
            .iter()
            .find(|r| r.source == "doc-leak-failing")
            .map(|r| r.id.clone())
    })
    .await;
    assert!(
        receiver
            .requests()
            .iter()
            .any(|r| r.answered == 500 && r.signature_ok),
        "the failing attempts were signed with the new secret"
    );

    // 4. A test delivery while failing: its reply carries the receiver's answer.
    let (code, reply) = call(
        "test",
        "POST",
        format!("/api/webhooks/{id}/test?namespace={ns}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["success"], false, "{reply}");

    // 5. The receiver recovers: redeliver one failed delivery, recover the rest.
    receiver.set(false, &new_secret);
    let (code, reply) = call(
        "redeliver",
        "POST",
        format!("/api/webhooks/{id}/deliveries/{failed_id}/redeliver?namespace={ns}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["success"], true, "{reply}");
    let (code, reply) = call(
        "recover",
        "POST",
        format!("/api/webhooks/{id}/recover?namespace={ns}&since=2020-01-01T00:00:00Z"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    eventually("every event delivered", WAIT, || async {
        (receiver.delivered().len() >= sent).then_some(())
    })
    .await;

    // 6. Every read endpoint.
    for (what, path) in [
        ("list", format!("/api/webhooks?namespace={ns}")),
        ("get", format!("/api/webhooks/{id}?namespace={ns}")),
        (
            "history",
            format!("/api/webhooks/{id}/deliveries?namespace={ns}"),
        ),
        (
            "search by document",
            format!("/api/webhooks/{id}/deliveries?namespace={ns}&document_id=10"),
        ),
        (
            "search by delivery",
            format!("/api/webhooks/{id}/deliveries?namespace={ns}&delivery_id={failed_id}"),
        ),
    ] {
        let (code, reply) = call(what, "GET", path, None).await;
        assert_eq!(code, 200, "{what}: {reply}");
    }
    let (code, reply) = call(
        "update",
        "PUT",
        format!("/api/webhooks/{id}?namespace={ns}"),
        Some(json!({"description": "still secret-free"})),
    )
    .await;
    assert_eq!(code, 200, "{reply}");

    // Everything the operator wrote.
    let kubectl = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cp.kubectl_ok(&args, None).await
    };
    let yaml = |kind: &str| {
        vec![
            "get".into(),
            kind.into(),
            "-n".into(),
            ns.clone(),
            "-o".into(),
            "yaml".into(),
        ]
    };
    // Events are recorded beside the status, never waited on: under load they come a little
    // after the flow.
    let events = eventually(
        "the Kubernetes Events of the flow",
        Duration::from_secs(30),
        || async {
            let events = kubectl(yaml("events")).await;
            events.contains("kind: Event").then_some(events)
        },
    )
    .await;
    let webhooks_yaml = kubectl(yaml("webhooks")).await;
    let document_events = kubectl(yaml("documentevents")).await;
    let (_, metrics) = http_get(op.metrics_addr, "/metrics").await.unwrap();
    let log = op.log_text();
    let mut corpus = vec![
        ("operator log".to_owned(), log.clone()),
        ("Kubernetes Events".to_owned(), events.clone()),
        ("Webhooks".to_owned(), webhooks_yaml.clone()),
        ("DocumentEvents".to_owned(), document_events.clone()),
        ("/metrics".to_owned(), metrics.clone()),
    ];
    if let Some(nats) = nats {
        let messages = stream_messages(nats).await;
        assert!(messages.contains("hookrelay.attempts."), "{messages}");
        corpus.push(("JetStream stream".to_owned(), messages));
    }
    corpus.extend(replies);

    // The corpus is the real thing: debug lines of other crates, the failures and their text,
    // the Events of the flow, the attempts counted.
    for target in [
        "kube_client::",
        "hyper_util::",
        "reqwest::",
        "rustls::",
        "hookrelay::",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(" DEBUG ") && l.contains(target)),
            "no debug line of {target} in {}",
            op.log.display()
        );
    }
    assert!(
        webhooks_yaml.contains(&format!("HTTP 500: {FAILURE_TEXT}")),
        "{webhooks_yaml}"
    );
    assert!(document_events.contains("deliveries"), "{document_events}");
    assert!(events.contains("kind: Event"), "{events}");
    assert!(metrics.contains("hookrelay_delivery_attempts_total"));

    let secrets_searched = [
        ("generated secret", old_secret.as_str()),
        ("rotated secret", new_secret.as_str()),
        ("headersFrom value", header_value.as_str()),
        ("API token", token.as_str()),
    ];
    let hits = find_leaks(&corpus, &secrets_searched);

    // The search finds a planted occurrence in each shape a leak would take: the creation
    // reply as it was, the Secret as the API server returns it (base64), a debug line of its
    // bytes, the key in hex.
    let secret_yaml = kubectl(vec![
        "get".into(),
        "secret".into(),
        format!("{id}-secret"),
        "-n".into(),
        ns.clone(),
        "-o".into(),
        "yaml".into(),
    ])
    .await;
    let key = STANDARD
        .decode(new_secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let planted = [
        ("planted: creation reply", created.to_string()),
        ("planted: Secret yaml", secret_yaml),
        (
            "planted: debug line",
            format!("DEBUG hookrelay: secret {:?}", new_secret.as_bytes()),
        ),
        ("planted: hex key", format!("key={}", hex::encode(&key))),
        (
            "planted: header",
            format!("headers: {{\"Authorization\": {header_value:?}}}"),
        ),
    ];
    let mut with_planted = corpus.clone();
    with_planted.extend(planted.iter().map(|(s, t)| (s.to_string(), t.clone())));
    let planted_hits = find_leaks(&with_planted, &secrets_searched);
    let found: Vec<&str> = planted
        .iter()
        .map(|(source, _)| *source)
        .filter(|source| {
            planted_hits
                .iter()
                .any(|h| h.starts_with(&format!("{source}:")))
        })
        .collect();
    assert!(
        planted_hits.contains(&"planted: creation reply: generated secret (value)".to_owned())
            && planted_hits
                .contains(&"planted: Secret yaml: rotated secret (value as base64)".to_owned())
            && planted_hits
                .contains(&"planted: debug line: rotated secret (value as debug bytes)".to_owned())
            && planted_hits.contains(&"planted: hex key: rotated secret (key as hex)".to_owned())
            && planted_hits.contains(&"planted: header: headersFrom value (value)".to_owned()),
        "the search missed a planted secret: {planted_hits:#?}"
    );

    // The receiver side: signatures are HMACs, never the secret (the header value is meant
    // for it, so only the signing secrets are searched there).
    let received: Vec<(String, String)> = receiver
        .requests()
        .into_iter()
        .map(|r| {
            (
                format!("request {}", r.delivery_id),
                format!("{}\n{}", r.headers, r.body),
            )
        })
        .collect();
    let received_hits = find_leaks(&received, &secrets_searched[..2]);
    assert!(
        received
            .iter()
            .all(|(_, text)| text.contains(&header_value)),
        "the headersFrom value reached the receiver"
    );

    let delivered = receiver.delivered().len();
    // Deliveries answered 200 more than once (recover may resend the redelivered one).
    let duplicates = receiver
        .requests()
        .iter()
        .filter(|r| r.answered == 200)
        .count()
        - delivered;
    let corpus_bytes: usize = corpus.iter().map(|(_, t)| t.len()).sum();
    eprintln!(
        "FIGURES {test}: sent={sent} delivered={delivered} duplicates={duplicates} lost={} recover_s=- sources={} corpus_bytes={corpus_bytes} log_lines={} forms={} hits={} planted_found={}/{} receiver_requests={} receiver_hits={} build=debug",
        sent.saturating_sub(delivered),
        corpus.len(),
        log.lines().count(),
        secrets_searched
            .iter()
            .map(|(_, s)| leak_forms(s).len())
            .sum::<usize>(),
        hits.len(),
        found.len(),
        planted.len(),
        received.len(),
        received_hits.len(),
    );
    assert!(hits.is_empty(), "secrets leaked: {hits:#?}");
    assert!(
        received_hits.is_empty(),
        "the receiver got a secret: {received_hits:#?}"
    );
    assert_eq!(found.len(), planted.len(), "{planted_hits:#?}");
}

/// The search itself, without a cluster: each encoding of a leak is found, and the signature
/// (an HMAC keyed by the secret) is not mistaken for one.
#[test]
fn the_search_finds_each_form_a_leak_takes() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw+/v9x0nZ1ko=";
    let key = STANDARD.decode(&secret[6..]).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(b"{}");
    let signature = hex::encode(mac.finalize().into_bytes());
    let corpus = |text: String| vec![("text".to_owned(), text)];
    let leaks = |text: String| find_leaks(&corpus(text), &[("s", secret)]);
    for (text, form) in [
        (
            format!("data:\n  secret: {}", STANDARD.encode(secret)),
            "value as base64",
        ),
        (
            format!(
                "{{\"s\":{}}}",
                serde_json::to_string(secret).unwrap().replace('/', "\\/")
            ),
            "value JSON-escaped with \\/",
        ),
        (
            format!("ByteString({:?})", secret.as_bytes()),
            "value as debug bytes",
        ),
        (
            format!(
                "GET /x?secret={}",
                secret
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            ),
            "value percent-encoded",
        ),
        (format!("key={}", hex::encode_upper(&key)), "key as HEX"),
        (
            format!("key={}", URL_SAFE_NO_PAD.encode(&key)),
            "key as url-safe base64",
        ),
    ] {
        let found = leaks(text.clone());
        assert!(
            found.contains(&format!("text: s ({form})")),
            "{form} not found in {text}: {found:?}"
        );
    }
    assert_eq!(
        leaks(format!("X-Webhook-Signature: {signature}")),
        Vec::<String>::new()
    );
}
