//! Ingest that tells the truth: idempotency keys (durable and direct), batches refused midway
//! saying what was stored, and a fair share of the direct queue per namespace.

use std::time::Duration;

use hookrelay::{
    crd::{DocumentEvent, Webhook},
    http::IngestMode,
    keys::WebhookKey,
    routing::RouteState,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::support::counting_webhook;
use crate::support::{
    CountingReceiver, InProcess, control_plane, create_webhook, eventually, ingest_args,
    post_events, wait_phase,
};

const SECRET: &str = "a-strong-signing-secret-for-ingest-tests";

async fn event_names(events: &Api<DocumentEvent>) -> Vec<String> {
    let mut names: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.metadata.name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_sent_twice_with_one_key_is_stored_and_delivered_once() {
    let cp = control_plane();
    let ns = cp.namespace("idem-durable").await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::Durable, None).await;
    let client = cp.client().await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);

    let body = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":1,"status":"completed"}}"#;
    let (status, first) = post_events(op.op.listen_addr, &ns, Some("order-1"), body).await;
    assert_eq!(status, 202, "{first}");
    let name = first["document_events"][0].as_str().unwrap().to_owned();
    assert_eq!(name, hookrelay::http::keyed_event_name("order-1"));
    assert_eq!(first["duplicates"], json!([]));
    assert!(
        first["idempotency"]
            .as_str()
            .unwrap()
            .contains("--event-retention"),
        "{first}"
    );
    let stored = events.get(&name).await.unwrap();
    assert_eq!(
        stored
            .metadata
            .annotations
            .unwrap_or_default()
            .get("hookrelay.dev/idempotency-key")
            .map(String::as_str),
        Some("order-1")
    );
    let delivered = wait_phase(&client, &ns, &name, "Delivered").await;

    // The client retries (its first reply was lost, say): the same event, keys in another order.
    let same = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"status":"completed","document_id":1}}"#;
    let (status, again) = post_events(op.op.listen_addr, &ns, Some("order-1"), same).await;
    assert_eq!(
        (status, &again["document_events"], &again["duplicates"]),
        (202, &json!([name]), &json!([0])),
        "{again}"
    );
    let after = events.get(&name).await.unwrap();
    assert_eq!(
        after.metadata.uid, delivered.metadata.uid,
        "the first DocumentEvent, not a new one"
    );
    assert_eq!(event_names(&events).await, std::slice::from_ref(&name));

    // Another event under the same key: 409, nothing stored.
    let other = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":2}}"#;
    let (status, conflict) = post_events(op.op.listen_addr, &ns, Some("order-1"), other).await;
    assert_eq!(
        (status, conflict["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{conflict}"
    );
    assert_eq!(event_names(&events).await, std::slice::from_ref(&name));

    // The receiver saw one delivery id, once.
    let ids: Vec<String> = after
        .status
        .unwrap()
        .deliveries
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids.len(), 1);
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen, [(ids[0].clone(), 1)].into(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_midway_says_what_was_stored_and_its_retry_stores_nothing_twice() {
    let cp = control_plane();
    let ns = cp.namespace("idem-batch").await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::Durable, None).await;
    let client = cp.client().await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);

    let (status, reply) = post_events(
        op.op.listen_addr,
        &ns,
        None,
        r#"{"event":"document.uploaded","id":"taken","data":{"document_id":0}}"#,
    )
    .await;
    assert_eq!(status, 202, "{reply}");

    // Event 1 reuses a key for other content: the API refuses it, after 0 and 2 were stored.
    let batch = |second_id: &str| {
        format!(
            r#"[{{"event":"document.uploaded","id":"b-0","data":{{"document_id":10}}}},
               {{"event":"document.uploaded","id":"{second_id}","data":{{"document_id":11}}}},
               {{"event":"document.uploaded","id":"b-2","data":{{"document_id":12}}}}]"#
        )
    };
    let (status, refused) = post_events(op.op.listen_addr, &ns, None, &batch("taken")).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{refused}"
    );
    let name = hookrelay::http::keyed_event_name;
    assert_eq!(
        refused["error"]["stored"],
        json!([{"index": 0, "name": name("b-0")}, {"index": 2, "name": name("b-2")}]),
        "{refused}"
    );
    assert_eq!(refused["error"]["not_stored"], json!([1]), "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 of 3 events were stored"),
        "{refused}"
    );
    // Nothing was taken back: what was stored goes out.
    let mut expected = vec![name("taken"), name("b-0"), name("b-2")];
    expected.sort();
    assert_eq!(event_names(&events).await, expected);

    // The client fixes event 1 and sends the whole batch again: only event 1 is new.
    let (status, retried) = post_events(op.op.listen_addr, &ns, None, &batch("b-1")).await;
    assert_eq!(
        (status, &retried["duplicates"], retried["accepted"].as_u64()),
        (202, &json!([0, 2]), Some(3)),
        "{retried}"
    );
    expected.push(name("b-1"));
    expected.sort();
    assert_eq!(event_names(&events).await, expected);

    for n in &expected {
        wait_phase(&client, &ns, n, "Delivered").await;
    }
    assert_eq!(
        receiver.counts(),
        (4, 4),
        "four events, each delivered once: {:?}",
        receiver.seen.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_event_sent_twice_with_one_key_is_delivered_once() {
    let cp = control_plane();
    let ns = cp.namespace("idem-direct").await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::Direct, None).await;
    let client = cp.client().await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    eventually("the webhook routed", Duration::from_secs(30), || async {
        (!op.op.routes.snapshot().is_empty()).then_some(())
    })
    .await;

    let body = r#"{"event":"document.completed","data":{"document_id":1}}"#;
    let (status, first) = post_events(op.op.listen_addr, &ns, Some("direct-1"), body).await;
    assert_eq!(
        (status, first["deliveries"].as_u64(), &first["duplicates"]),
        (202, Some(1), &json!([])),
        "{first}"
    );
    assert!(
        first["idempotency"]
            .as_str()
            .unwrap()
            .contains("10 minutes"),
        "{first}"
    );
    eventually("the first delivery", Duration::from_secs(30), || async {
        (receiver.counts() == (1, 1)).then_some(())
    })
    .await;

    let (status, again) = post_events(op.op.listen_addr, &ns, Some("direct-1"), body).await;
    assert_eq!(
        (status, again["deliveries"].as_u64(), &again["duplicates"]),
        (202, Some(0), &json!([0])),
        "{again}"
    );
    let (status, conflict) = post_events(
        op.op.listen_addr,
        &ns,
        Some("direct-1"),
        r#"{"event":"document.completed","data":{"document_id":2}}"#,
    )
    .await;
    assert_eq!(
        (status, conflict["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{conflict}"
    );

    // A later event without a key goes out; by then the duplicate would have, too.
    let (status, _) = post_events(op.op.listen_addr, &ns, None, body).await;
    assert_eq!(status, 202);
    eventually("the later delivery", Duration::from_secs(30), || async {
        (receiver.counts().0 == 2).then_some(())
    })
    .await;
    assert_eq!(
        receiver.counts(),
        (2, 2),
        "{:?}",
        receiver.seen.lock().unwrap()
    );
}

/// Namespace `a` with a paused Webhook, `b` with a live one; direct queue 8, 2 per namespace.
async fn paused_and_live(
    hold: Duration,
) -> (
    InProcess,
    String,
    String,
    CountingReceiver,
    std::net::SocketAddr,
) {
    let cp = control_plane();
    let a = cp.namespace("share-a").await;
    let b = cp.namespace("share-b").await;
    let mut args = ingest_args(&[&a, &b], IngestMode::Direct, None);
    args.direct_queue = 8;
    args.direct_queue_per_namespace = Some(2);
    args.direct_max_hold = hold;
    let op = InProcess::start_with(cp.config().await, args).await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &a,
        "held",
        &format!("http://{addr}/a"),
        SECRET,
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &b,
        "live",
        &format!("http://{addr}/b"),
        SECRET,
        json!({}),
    )
    .await;
    Api::<Webhook>::namespaced(client, &a)
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    eventually("a's webhook paused", Duration::from_secs(30), || async {
        let table = op.op.routes.snapshot();
        let route = table.get(&WebhookKey::new(&a, "held"))?;
        (route.state == RouteState::Paused).then_some(())
    })
    .await;
    (op, a, b, receiver, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_holding_its_share_of_the_direct_queue_does_not_block_another() {
    let (op, a, b, receiver, _) = paused_and_live(Duration::from_secs(3600)).await;
    let event = r#"{"event":"document.completed","data":{"document_id":1}}"#;

    // a's two deliveries are held (paused), filling a's share.
    for _ in 0..2 {
        let (status, reply) = post_events(op.op.listen_addr, &a, None, event).await;
        assert_eq!(
            (status, reply["deliveries"].as_u64()),
            (202, Some(1)),
            "{reply}"
        );
    }
    let (status, refused) = post_events(op.op.listen_addr, &a, None, event).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (429, Some("namespace_queue_full")),
        "{refused}"
    );
    assert!(
        refused["error"]["message"].as_str().unwrap().contains(&a),
        "{refused}"
    );

    // b is served all along: more events than a's share, and the global queue is not full.
    for i in 0..5 {
        let (status, reply) = post_events(op.op.listen_addr, &b, None, event).await;
        assert_eq!(status, 202, "b's event {i}: {reply}");
        eventually("b's delivery", Duration::from_secs(30), || async {
            (receiver.counts().0 == i + 1).then_some(())
        })
        .await;
    }
    // a is still refused while its deliveries are held.
    let (status, _) = post_events(op.op.listen_addr, &a, None, event).await;
    assert_eq!(status, 429);
}

// One event to more Webhooks than a namespace's share of the direct queue cannot be split, so
// it is admitted whole; a request of several such events can be, so it is refused with 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_fanning_out_past_the_namespace_share_is_delivered_to_every_webhook() {
    let (op, _a, b, receiver, addr) = paused_and_live(Duration::from_secs(3600)).await;
    let client = control_plane().client().await;
    for i in 0..4 {
        create_webhook(
            &client,
            &b,
            &format!("wide-{i}"),
            &format!("http://{addr}/b{i}"),
            SECRET,
            json!({}),
        )
        .await;
    }
    eventually(
        "b's five webhooks routed",
        Duration::from_secs(30),
        || async {
            let table = op.op.routes.snapshot();
            (0..4)
                .all(|i| {
                    table
                        .get(&WebhookKey::new(&b, &format!("wide-{i}")))
                        .is_some()
                })
                .then_some(())
        },
    )
    .await;

    let event = r#"{"event":"document.completed","data":{"document_id":1}}"#;
    let (status, reply) = post_events(op.op.listen_addr, &b, None, event).await;
    assert_eq!(
        (status, reply["deliveries"].as_u64()),
        (202, Some(5)),
        "five deliveries against a share of two: {reply}"
    );
    eventually("all five delivered", Duration::from_secs(30), || async {
        (receiver.counts() == (5, 5)).then_some(())
    })
    .await;

    let two = format!("[{event},{event}]");
    let (status, refused) = post_events(op.op.listen_addr, &b, None, &two).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (413, Some("too_many_deliveries")),
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a request of one event is admitted"),
        "{refused}"
    );
    assert_eq!(
        receiver.counts(),
        (5, 5),
        "nothing of the refused request went out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_direct_delivery_gives_its_place_back_after_direct_max_hold() {
    let (op, a, ..) = paused_and_live(Duration::from_secs(1)).await;
    let event = r#"{"event":"document.completed","data":{"document_id":1}}"#;
    for _ in 0..2 {
        let (status, _) = post_events(op.op.listen_addr, &a, None, event).await;
        assert_eq!(status, 202);
    }
    // Held past --direct-max-hold, the deliveries give up and a's share comes back.
    eventually("a accepted again", Duration::from_secs(60), || async {
        let (status, _) = post_events(op.op.listen_addr, &a, None, event).await;
        (status == 202).then_some(())
    })
    .await;
}

// A retry of a body whose numbers the API server gives back normalised (10.0 as 10) is the same
// event: compared by the fingerprint stored with it, not by the spec read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_retry_with_numbers_the_api_server_normalises_is_a_duplicate() {
    let cp = control_plane();
    let ns = cp.namespace("idem-float").await;
    let op = InProcess::ingesting(cp, &[&ns], IngestMode::Durable, None).await;
    let client = cp.client().await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let float = r#"{"event":"document.completed","data":{"amount":10.0,"ratio":1e2}}"#;
    let (status, first) = post_events(op.op.listen_addr, &ns, Some("order-float"), float).await;
    assert_eq!(status, 202, "{first}");
    let stored = events
        .get(first["document_events"][0].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.spec.data["amount"],
        json!(10),
        "the API server normalises numbers (what makes this test needed)"
    );
    let (status, again) = post_events(op.op.listen_addr, &ns, Some("order-float"), float).await;
    assert_eq!(
        (status, &again["duplicates"]),
        (202, &json!([0])),
        "an exact retry is a duplicate: {again}"
    );
    let other = r#"{"event":"document.completed","data":{"amount":11.0,"ratio":1e2}}"#;
    let (status, conflict) = post_events(op.op.listen_addr, &ns, Some("order-float"), other).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(event_names(&events).await.len(), 1);
}
