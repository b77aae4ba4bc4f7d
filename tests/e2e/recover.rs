//! Recover (`POST /api/webhooks/{id}/recover?since=`) and search (`GET .../deliveries?document_id=`
//! or `?delivery_id=`) from what is retained: DocumentEvents, and the stream in JetStream mode.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hookrelay::{crd::Webhook, http::IngestMode};
use kube::Api;
use serde_json::{Value, json};

use crate::support::{ModeOperator, api_call, control_plane, create_webhook, eventually};

const WAIT: Duration = Duration::from_secs(90);

/// A receiver that answers 500 to events whose `data.fail` is true until it is fixed, and 200
/// otherwise; it keeps every request's delivery id, document id and answer.
#[derive(Clone, Default)]
struct Flaky {
    fixed: Arc<AtomicBool>,
    /// (delivery id, document id, status answered), in arrival order.
    got: Arc<Mutex<Vec<(String, i64, u16)>>>,
}

impl Flaky {
    async fn start() -> (Flaky, std::net::SocketAddr) {
        let flaky = Flaky::default();
        let (fixed, got) = (flaky.fixed.clone(), flaky.got.clone());
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (fixed, got) = (fixed.clone(), got.clone());
                async move {
                    let id = headers
                        .get("x-webhook-delivery")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let fail = body["data"]["fail"] == json!(true) && !fixed.load(Ordering::SeqCst);
                    let status = if fail { 500 } else { 200 };
                    let document = body["data"]["document_id"].as_i64().unwrap_or(-1);
                    got.lock().unwrap().push((id, document, status));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (flaky, addr)
    }

    fn got(&self) -> Vec<(String, i64, u16)> {
        self.got.lock().unwrap().clone()
    }
}

async fn stats(webhooks: &Api<Webhook>, name: &str) -> Option<(i64, i64)> {
    let stats = webhooks.get(name).await.ok()?.status?.delivery_stats;
    Some((stats.succeeded, stats.failed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_sends_again_exactly_the_deliveries_that_failed_since_then() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in [IngestMode::Durable, IngestMode::JetStream] {
        let ns = cp.namespace("recover").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let api = op.op.op.listen_addr;
        let (flaky, addr) = Flaky::start().await;
        create_webhook(
            &client,
            &ns,
            "flaky",
            &format!("http://{addr}/h"),
            "recover-signing-secret-0123",
            json!({"maxAttempts": 1}),
        )
        .await;
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        let before = k8s_openapi::jiff::Timestamp::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap();
        // Four events fail for good (one attempt each), three succeed.
        let events: Vec<Value> = (0..7)
            .map(|i| json!({"event": "document.completed", "data": {"document_id": i, "fail": i % 2 == 0}}))
            .collect();
        op.post_events(&ns, &events).await;
        eventually(
            &format!("{mode:?}: 3 delivered, 4 failed"),
            WAIT,
            || async { (stats(&webhooks, "flaky").await? == (3, 4)).then_some(()) },
        )
        .await;
        let failed: HashMap<String, i64> = flaky
            .got()
            .into_iter()
            .filter(|(_, _, status)| *status == 500)
            .map(|(id, document, _)| (id, document))
            .collect();
        assert_eq!(failed.len(), 4, "{mode:?}: {:?}", flaky.got());

        // Refused: no since, a bad one, an unknown webhook.
        for query in ["", "since=yesterday&", "since=2026-01-01&"] {
            let (status, body) = api_call(
                api,
                "POST",
                &format!("/api/webhooks/flaky/recover?{query}namespace={ns}"),
                None,
                None,
            )
            .await;
            assert_eq!(status, 400, "{mode:?} {query}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("RFC 3339"), "{body}");
        }
        let (status, _) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/nope/recover?since={before}&namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(status, 404);

        flaky.fixed.store(true, Ordering::SeqCst);
        let (status, body) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/flaky/recover?since={before}&namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (status, &body["queued"]),
            (200, &json!(4)),
            "{mode:?}: {body}"
        );
        eventually(
            &format!("{mode:?}: the 4 recovered delivered"),
            WAIT,
            || async { (stats(&webhooks, "flaky").await? == (7, 4)).then_some(()) },
        )
        .await;
        // Exactly the failed ones came again, under their own delivery ids, and succeeded.
        let again: HashMap<String, i64> = flaky.got()[7..]
            .iter()
            .map(|(id, document, status)| {
                assert_eq!(*status, 200);
                (id.clone(), *document)
            })
            .collect();
        assert_eq!(again, failed, "{mode:?}");
        assert_eq!(flaky.got().len(), 11, "{mode:?}: nothing else was sent");

        // Since after those failures: nothing to recover.
        let after = k8s_openapi::jiff::Timestamp::now();
        let (status, body) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/flaky/recover?since={after}&namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (status, &body["queued"]),
            (200, &json!(0)),
            "{mode:?}: {body}"
        );
        // And since before them again: they succeeded since, so nothing either.
        let (status, body) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/flaky/recover?since={before}&namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (status, &body["queued"]),
            (200, &json!(0)),
            "{mode:?}: {body}"
        );
        op.op.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_older_than_the_recent_ones_is_found_by_document_id_and_delivery_id() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in [IngestMode::Durable, IngestMode::JetStream] {
        let ns = cp.namespace("search").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let api = op.op.op.listen_addr;
        let (receiver, addr) = Flaky::start().await;
        create_webhook(
            &client,
            &ns,
            "hook",
            &format!("http://{addr}/h"),
            "search-signing-secret-0123",
            json!({}),
        )
        .await;
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        // One at a time, so that the first is the oldest in the history.
        for i in 0..30 {
            op.post_event(&ns, "document.completed", json!({"document_id": 1000 + i}))
                .await;
            eventually("the event delivered", WAIT, || async {
                (receiver.got().len() > i).then_some(())
            })
            .await;
        }
        eventually(&format!("{mode:?}: 30 in the stats"), WAIT, || async {
            (stats(&webhooks, "hook").await? == (30, 0)).then_some(())
        })
        .await;
        let first = receiver.got()[0].clone();
        assert_eq!(first.1, 1000);
        let (_, recent) = api_call(
            api,
            "GET",
            &format!("/api/webhooks/hook/deliveries?namespace={ns}"),
            None,
            None,
        )
        .await;
        let recent = recent["deliveries"].as_array().unwrap().clone();
        assert_eq!(recent.len(), 20);
        assert!(recent.iter().all(|d| d["id"] != json!(first.0)), "{mode:?}");

        for query in [
            "document_id=1000".to_owned(),
            format!("delivery_id={}", first.0),
        ] {
            let (status, body) = api_call(
                api,
                "GET",
                &format!("/api/webhooks/hook/deliveries?{query}&namespace={ns}"),
                None,
                None,
            )
            .await;
            assert_eq!(status, 200, "{mode:?} {query}: {body}");
            let found = body["deliveries"].as_array().unwrap();
            assert!(!found.is_empty(), "{mode:?} {query}: {body}");
            assert!(
                found
                    .iter()
                    .all(|d| d["id"] == json!(first.0) && d["success"] == json!(true)),
                "{mode:?} {query}: {body}"
            );
        }
        for bad in [
            "document_id=1&delivery_id=msg_1",
            "delivery_id=nope",
            "document_id=",
        ] {
            let (status, body) = api_call(
                api,
                "GET",
                &format!("/api/webhooks/hook/deliveries?{bad}&namespace={ns}"),
                None,
                None,
            )
            .await;
            assert_eq!(status, 400, "{mode:?} {bad}: {body}");
        }
        op.op.stop().await;
    }
}

/// Direct ingest keeps no event: its failed deliveries cannot be recovered (the README says
/// so), while a DocumentEvent created beside it in the same mode can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_ingest_keeps_nothing_to_recover_but_document_events_are() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("recover-direct").await;
    let op = ModeOperator::start(cp, IngestMode::Direct, &[&ns], |_| {}).await;
    let api = op.op.op.listen_addr;
    let (flaky, addr) = Flaky::start().await;
    create_webhook(
        &client,
        &ns,
        "flaky",
        &format!("http://{addr}/h"),
        "recover-signing-secret-0123",
        json!({"maxAttempts": 1}),
    )
    .await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let before = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap();
    op.post_event(
        &ns,
        "document.completed",
        json!({"document_id": 1, "fail": true}),
    )
    .await;
    crate::support::create_event(
        &client,
        &ns,
        "kept",
        "document.completed",
        json!({"document_id": 2, "fail": true}),
    )
    .await;
    eventually("both failed", WAIT, || async {
        (stats(&webhooks, "flaky").await? == (0, 2)).then_some(())
    })
    .await;
    flaky.fixed.store(true, Ordering::SeqCst);
    let (status, body) = api_call(
        api,
        "POST",
        &format!("/api/webhooks/flaky/recover?since={before}&namespace={ns}"),
        None,
        None,
    )
    .await;
    assert_eq!((status, &body["queued"]), (200, &json!(1)), "{body}");
    eventually("the DocumentEvent's delivery sent again", WAIT, || async {
        (stats(&webhooks, "flaky").await? == (1, 2)).then_some(())
    })
    .await;
    let again: Vec<i64> = flaky.got()[2..].iter().map(|(_, d, _)| *d).collect();
    assert_eq!(again, [2]);
    op.op.stop().await;
}

/// Waits until the Webhook's Ready condition has seen its current spec.
async fn applied(webhooks: &Api<Webhook>, name: &str) {
    eventually(&format!("{name}'s spec applied"), WAIT, || async {
        let w = webhooks.get(name).await.ok()?;
        let generation = w.metadata.generation?;
        w.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.observed_generation == Some(generation))
            .then_some(())
    })
    .await;
}

/// In JetStream mode, recover and search also find the deliveries of Webhooks delivered by the
/// leader alone (ordered or rate-limited: their work items are on the serial subject) and the
/// deliveries that failed because they were held longer than `--max-hold`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_recover_finds_serial_deliveries_and_those_held_too_long() {
    let cp = control_plane();
    let client = cp.client().await;
    let (ordered_ns, paused_ns) = (
        cp.namespace("recover-serial").await,
        cp.namespace("recover-held").await,
    );
    let op = ModeOperator::start(
        cp,
        IngestMode::JetStream,
        &[&ordered_ns, &paused_ns],
        |args| args.max_hold = Duration::from_secs(2),
    )
    .await;
    let api = op.op.op.listen_addr;
    let (flaky, addr) = Flaky::start().await;
    let url = format!("http://{addr}/h");
    let secret = "recover-signing-secret-0123";
    create_webhook(
        &client,
        &ordered_ns,
        "ordered",
        &url,
        secret,
        json!({"maxAttempts": 1}),
    )
    .await;
    create_webhook(&client, &paused_ns, "paused", &url, secret, json!({})).await;
    let patch = |spec: Value| kube::api::Patch::Merge(json!({ "spec": spec }));
    let params = kube::api::PatchParams::default();
    let ordered: Api<Webhook> = Api::namespaced(client.clone(), &ordered_ns);
    ordered
        .patch(
            "ordered",
            &params,
            &patch(json!({"ordering": {"key": "data.document_id"}})),
        )
        .await
        .unwrap();
    applied(&ordered, "ordered").await;
    let paused: Api<Webhook> = Api::namespaced(client.clone(), &paused_ns);
    paused
        .patch("paused", &params, &patch(json!({"paused": true})))
        .await
        .unwrap();
    applied(&paused, "paused").await;
    let before = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap();

    // Two ordered deliveries fail for good; the paused Webhook's delivery is held too long.
    for i in [10, 11] {
        op.post_event(
            &ordered_ns,
            "document.completed",
            json!({"document_id": i, "fail": true}),
        )
        .await;
    }
    op.post_event(&paused_ns, "document.completed", json!({"document_id": 20}))
        .await;
    eventually("the ordered deliveries failed", WAIT, || async {
        (stats(&ordered, "ordered").await? == (0, 2)).then_some(())
    })
    .await;
    let held_failure = eventually("the held delivery failed", WAIT, || async {
        let status = paused.get("paused").await.ok()?.status?;
        status
            .recent_deliveries
            .iter()
            .find(|d| d.error.as_deref().is_some_and(|e| e.contains("--max-hold")))
            .cloned()
    })
    .await;
    assert_eq!(
        held_failure.attempt, 0,
        "no attempt was made: {held_failure:?}"
    );

    // Searched by document id: the ordered Webhook's work item is found on its serial subject.
    let (status, body) = api_call(
        api,
        "GET",
        &format!("/api/webhooks/ordered/deliveries?document_id=10&namespace={ordered_ns}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["deliveries"].as_array().unwrap().is_empty(),
        "the ordered delivery was not found: {body}"
    );

    flaky.fixed.store(true, Ordering::SeqCst);
    paused
        .patch("paused", &params, &patch(json!({"paused": false})))
        .await
        .unwrap();
    applied(&paused, "paused").await;
    for (ns, name, expected) in [(&ordered_ns, "ordered", 2), (&paused_ns, "paused", 1)] {
        let (status, body) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/{name}/recover?since={before}&namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (status, &body["queued"]),
            (200, &json!(expected)),
            "{name}: {body}"
        );
    }
    eventually("every recovered delivery delivered", WAIT, || async {
        let ok: Vec<i64> = flaky
            .got()
            .iter()
            .filter(|r| r.2 == 200)
            .map(|r| r.1)
            .collect();
        (ok.contains(&10) && ok.contains(&11) && ok.contains(&20)).then_some(())
    })
    .await;
    op.op.stop().await;
}

/// A recover call may send 1,000 deliveries again: each Webhook gets 3 calls at once, then one
/// every 10 s. Five calls at once for one Webhook: three answered, two refused 429
/// `rate_limited` with a Retry-After within the 10 s and a message saying the limit; another
/// Webhook of the namespace is recovered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_is_rate_limited_per_webhook_saying_when_to_retry() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("recover-limit").await;
    let op = ModeOperator::start(cp, IngestMode::Durable, &[&ns], |_| {}).await;
    let api = op.op.op.listen_addr;
    for name in ["w", "v"] {
        crate::support::counting_webhook(&client, &ns, name, "recover-signing-secret-0123").await;
    }
    let since = k8s_openapi::jiff::Timestamp::now();
    let url = |name: &str| {
        format!("http://{api}/api/webhooks/{name}/recover?since={since}&namespace={ns}")
    };
    let http = reqwest::Client::new();
    // At once, so that the bucket cannot refill in between.
    let answers = futures::future::join_all((0..5).map(|_| http.post(url("w")).send())).await;
    let (mut answered, mut limited) = (0, Vec::new());
    for answer in answers {
        let answer = answer.unwrap();
        match answer.status().as_u16() {
            200 => answered += 1,
            429 => {
                let retry_after: u64 = answer.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
                limited.push((retry_after, body));
            }
            other => panic!("unexpected {other}: {}", answer.text().await.unwrap()),
        }
    }
    println!(
        "FIGURES recover::rate_limited calls=5 answered={answered} limited={} retry_after={:?}",
        limited.len(),
        limited.iter().map(|(r, _)| r).collect::<Vec<_>>()
    );
    assert_eq!((answered, limited.len()), (3, 2), "{limited:?}");
    for (retry_after, body) in &limited {
        assert!((1..=10).contains(retry_after), "{retry_after}");
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(
                "recover calls for webhook w are limited to 3 at once, then one every 10 s"
            ) && message.contains(&format!("retry in {retry_after} s")),
            "{message}"
        );
    }
    let answer = http.post(url("v")).send().await.unwrap();
    assert_eq!(
        answer.status().as_u16(),
        200,
        "another Webhook has its own bucket"
    );
    op.op.stop().await;
}
