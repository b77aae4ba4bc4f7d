//! The HTTP surface under hostile or careless clients (body limits, timeouts, JSON errors,
//! review caches and the /test rate limit), against the real API server with real tokens.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::Api;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    CountingReceiver, InProcess, api_call, control_plane, create_webhook, eventually,
    grant_hookrelay, local_args,
};

/// Sends `head` (a request without its body) and reads the response head, bounded so that a
/// server that waits for the body fails the test instead of hanging it.
async fn response_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an answer without the body being sent");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_count_as_other_and_make_no_new_series() {
    let cp = control_plane();
    let ns = cp.namespace("methods").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    for method in ["AAAAA1", "AAAAA2", "AAAAA3"] {
        let mut s = tokio::net::TcpStream::connect(op.op.listen_addr)
            .await
            .unwrap();
        s.write_all(
            format!("{method} /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let head = response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    }
    let text = op.op.metrics.encode();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("hookrelay_http_requests_total{"))
        .collect();
    assert!(
        !text.contains("AAAAA"),
        "a raw method became a label: {series:?}"
    );
    assert!(
        series
            .iter()
            .any(|l| l.contains(r#"method="other""#) && l.ends_with(" 3")),
        "{series:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_megabyte_is_refused_before_it_is_sent() {
    let cp = control_plane();
    let ns = cp.namespace("body-auth").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    for path in ["/api/events", "/api/webhooks"] {
        let mut s = tokio::net::TcpStream::connect(op.op.listen_addr)
            .await
            .unwrap();
        // Headers only: the 1 MiB announced is never sent.
        s.write_all(
            format!(
                "POST {path}?namespace={ns} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bogus\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let head = response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 401"), "{path}: {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_its_headers_is_disconnected() {
    let cp = control_plane();
    let ns = cp.namespace("slow-headers").await;
    let mut args = local_args(&[&ns]);
    args.header_read_timeout = Duration::from_secs(1);
    let op = InProcess::start_with(cp.config().await, args).await;
    let mut s = tokio::net::TcpStream::connect(op.op.listen_addr)
        .await
        .unwrap();
    s.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // The bound is far above the 1 s deadline; without a deadline the read never ends.
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the half-sent request still holds its connection"
    );
    assert!(
        !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_a_new_client_waits_until_one_closes() {
    let cp = control_plane();
    let ns = cp.namespace("conn-cap").await;
    let mut args = local_args(&[&ns]);
    args.max_connections = 2;
    args.header_read_timeout = Duration::from_secs(120);
    let op = InProcess::start_with(cp.config().await, args).await;
    let addr = op.op.listen_addr;
    let idle_1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _idle_2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The kernel completes the handshake (backlog); hookrelay must not serve it.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    // A negative can only be observed over a while; a slow machine makes it pass, never fail.
    let early = tokio::time::timeout(Duration::from_millis(500), third.peek(&mut byte)).await;
    assert!(
        early.is_err(),
        "a connection beyond --max-connections was served"
    );
    drop(idle_1);
    let head = response_head(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_tokens_does_not_cost_a_valid_caller_its_cache_entry() {
    let cp = control_plane();
    let ns = cp.namespace("token-flood").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let api = op.op.listen_addr;
    let token = cp.hookrelay_token(&ns, "admin").await;
    let list = format!("/api/webhooks?namespace={ns}");
    let (status, body) = api_call(api, "GET", &list, Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    let before = op.op.auth.token_reviews();

    let bogus = futures::stream::iter(0..500)
        .map(|i| {
            let list = list.clone();
            async move { api_call(api, "GET", &list, Some(&format!("bogus-{i}")), None).await }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>();
    let valid = futures::stream::iter(0..20)
        .then(|_| api_call(api, "GET", &list, Some(&token), None))
        .collect::<Vec<_>>();
    let (bogus, valid) = tokio::join!(bogus, valid);
    for (status, body) in &bogus {
        assert!(
            *status == 401 || (*status == 503 && body["error"]["code"] == "unavailable"),
            "{status} {body}"
        );
    }
    for (status, body) in &valid {
        assert_eq!(*status, 200, "the valid caller during the flood: {body}");
    }
    let after_flood = op.op.auth.token_reviews();
    assert!(
        after_flood - before <= 500,
        "at most one TokenReview per bogus token: {}",
        after_flood - before
    );
    let (status, _) = api_call(api, "GET", &list, Some(&token), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        op.op.auth.token_reviews(),
        after_flood,
        "the valid token was reviewed again: its entry was evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_must_be_minted_for_hookrelays_audience() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("audience").await;
    let plain = cp
        .service_account_token_without_audience(&ns, "plain")
        .await;
    grant_hookrelay(&client, &ns, &ns, "plain").await;
    let for_hookrelay = cp.service_account_token(&ns, "plain").await;
    let list = format!("/api/webhooks?namespace={ns}");
    {
        let op = InProcess::start(cp.config().await, &ns).await;
        let (status, body) = api_call(op.op.listen_addr, "GET", &list, Some(&plain), None).await;
        assert_eq!(status, 401, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("kubectl create token <serviceaccount> --audience hookrelay"),
            "{message}"
        );
        let (status, body) =
            api_call(op.op.listen_addr, "GET", &list, Some(&for_hookrelay), None).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut args = local_args(&[&ns]);
    args.token_audience = String::new();
    let op = InProcess::start_with(cp.config().await, args).await;
    let (status, body) = api_call(op.op.listen_addr, "GET", &list, Some(&plain), None).await;
    assert_eq!(status, 200, "with --token-audience \"\": {body}");
}

struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Self { issuer }
    }

    /// A serving certificate for localhost: (cert PEM, key PEM, cert DER).
    fn leaf(&self) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        // A resumed session would report the certificate of the first handshake.
        config.resumption = rustls::client::Resumption::disabled();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A TLS connection to `addr` as `localhost`: the certificate it presented, and its answer to
/// `GET /openapi.json`.
async fn https_get(tls: &tokio_rustls::TlsConnector, addr: SocketAddr) -> (Vec<u8>, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tls.connect(name, tcp).await.expect("the TLS handshake");
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    stream
        .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    (presented, String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_follows_a_rotated_certificate() {
    let cp = control_plane();
    let ns = cp.namespace("tls").await;
    let ca = TestCa::new();
    let dir = std::env::temp_dir().join(format!("hookrelay-tls-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (cert, key, first) = ca.leaf();
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let mut args = local_args(&[&ns]);
    args.tls_cert_file = Some(cert_file.clone());
    args.tls_key_file = Some(key_file.clone());
    let op = InProcess::start_with(cp.config().await, args).await;
    let tls = ca.client();

    let (presented, response) = https_get(&tls, op.op.listen_addr).await;
    assert_eq!(presented, first);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"openapi\""), "{response}");

    // (A broken or half-written pair keeping the old certificate is a unit test of serve.rs.)
    let (cert, key, second) = ca.leaf();
    std::fs::write(&key_file, &key).unwrap();
    std::fs::write(&cert_file, cert).unwrap();
    eventually(
        "the rotated certificate to be presented",
        Duration::from_secs(60),
        || async {
            let (presented, response) = https_get(&tls, op.op.listen_addr).await;
            (presented == second && response.starts_with("HTTP/1.1 200")).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_are_not_object_names_are_404_and_reach_no_subresource() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("ids").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let token = cp.hookrelay_token(&ns, "admin").await;
    let (_receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "x",
        &format!("http://{addr}/hook"),
        "a-strong-enough-secret-value",
        json!({}),
    )
    .await;
    let api = op.op.listen_addr;
    let (status, body) = api_call(
        api,
        "GET",
        &format!("/api/webhooks/x?namespace={ns}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for path in [
        "/api/webhooks/x%2Fstatus",
        "/api/webhooks/X",
        "/api/webhooks/x%2Fstatus/deliveries",
        "/api/webhooks/x/deliveries/..%2Fx/redeliver",
    ] {
        let method = if path.ends_with("redeliver") {
            "POST"
        } else {
            "GET"
        };
        let (status, body) = api_call(
            api,
            method,
            &format!("{path}?namespace={ns}"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_not_watched_are_refused_with_422() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("watched").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let token = cp.hookrelay_token(&ns, "admin").await;
    // RBAC would allow it: only the watched set refuses it.
    grant_hookrelay(&client, "default", &ns, "admin").await;
    let api = op.op.listen_addr;
    let marker = format!("unwatched-{ns}");
    let event = json!({"event": "document.completed", "data": {"marker": marker}}).to_string();
    let (status, body) = api_call(
        api,
        "POST",
        "/api/events?namespace=default",
        Some(&token),
        Some(&event),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "namespace_not_watched");
    let message = body["error"]["message"].as_str().unwrap();
    // Which namespaces it watches is not said: they are other tenants'.
    assert!(
        !message.contains(&ns) && message.contains("--watch-namespace"),
        "{message}"
    );
    let (status, body) = api_call(
        api,
        "GET",
        "/api/webhooks?namespace=default",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let stored = Api::<hookrelay::crd::DocumentEvent>::namespaced(client.clone(), "default")
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        !stored
            .items
            .iter()
            .any(|e| e.spec.data.get("marker") == Some(&Value::String(marker.clone()))),
        "an event for an unwatched namespace was stored"
    );
    // The watched namespace still works.
    let (status, body) = api_call(
        api,
        "POST",
        &format!("/api/events?namespace={ns}"),
        Some(&token),
        Some(&event),
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_deliveries_are_rate_limited_per_webhook() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("test-limit").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let token = cp.hookrelay_token(&ns, "admin").await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "probe",
        &format!("http://{addr}/hook"),
        "a-strong-enough-secret-value",
        json!({}),
    )
    .await;
    let url = format!(
        "http://{}/api/webhooks/probe/test?namespace={ns}",
        op.op.listen_addr
    );
    let http = reqwest::Client::new();
    // At once, so that the bucket (3, refilled 1 a second) cannot refill in between.
    let answers =
        futures::future::join_all((0..5).map(|_| http.post(&url).bearer_auth(&token).send())).await;
    let mut limited = 0;
    let mut delivered = 0;
    for answer in answers {
        let answer = answer.unwrap();
        match answer.status().as_u16() {
            200 => delivered += 1,
            429 => {
                limited += 1;
                let retry_after: u64 = answer.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1);
                let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            }
            other => panic!("unexpected {other}: {}", answer.text().await.unwrap()),
        }
    }
    assert!(limited >= 1, "5 test deliveries at once were all sent");
    assert!(delivered >= 3, "the burst of 3 was refused: {delivered}");
    assert_eq!(receiver.counts().1, delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_gets_408() {
    let cp = control_plane();
    let ns = cp.namespace("slow-body").await;
    let mut args = local_args(&[&ns]);
    args.request_timeout = Duration::from_secs(1);
    args.disable_auth = true;
    let op = InProcess::start_with(cp.config().await, args).await;
    let mut s = tokio::net::TcpStream::connect(op.op.listen_addr)
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /api/webhooks?namespace={ns} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"url\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    let response = format!("{head}{}", String::from_utf8_lossy(&rest));
    assert!(response.contains("\"request_timeout\""), "{response}");
}

// A manual delivery to a Webhook that cannot be delivered to says why at once (409 with the
// Ready reason), instead of "try again" or a 408 after waiting for a slot that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_delivery_to_a_webhook_that_is_not_ready_says_why() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("test-not-ready").await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let token = cp.hookrelay_token(&ns, "admin").await;
    let webhooks: kube::Api<hookrelay::crd::Webhook> = kube::Api::namespaced(client.clone(), &ns);
    let w: hookrelay::crd::Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "nosecret"},
        "spec": {"url": "http://127.0.0.1:9/hook", "events": ["*"], "secretRef": {"name": "missing"}}
    }))
    .unwrap();
    webhooks
        .create(&kube::api::PostParams::default(), &w)
        .await
        .unwrap();
    let addr = op.op.listen_addr;
    let body = eventually(
        "the webhook routed (not Ready)",
        Duration::from_secs(60),
        || {
            let token = token.clone();
            let ns = ns.clone();
            async move {
                let (status, body) = api_call(
                    addr,
                    "POST",
                    &format!("/api/webhooks/nosecret/test?namespace={ns}"),
                    Some(&token),
                    None,
                )
                .await;
                (status == 409).then_some(body)
            }
        },
    )
    .await;
    assert_eq!(body["error"]["code"], "webhook_not_ready", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("SecretNotFound"), "{message}");
}
