//! At-least-once across a crash: SIGKILL the operator with deliveries in flight.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use hookrelay::crd::{DocumentEvent, EventPhase};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::support::{CountingReceiver, OperatorArgs, control_plane, create_webhook, eventually};

const EVENTS: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_when_the_operator_is_killed_mid_delivery() {
    let cp = control_plane();
    let ns = cp.namespace("sigkill").await;
    let client = cp.client().await;
    // A slow endpoint (each answer takes 25 ms, 8 in flight) keeps deliveries outstanding
    // long enough for the kill to land among them.
    let (receiver, addr) = CountingReceiver::start_slow(Duration::from_millis(25)).await;
    let args = OperatorArgs::new(&ns).with_auth();
    let mut first = args.start(cp);
    first.wait_ready().await;

    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        "signing-secret-0123456789",
        json!({"initialBackoffSeconds": 1}),
    )
    .await;

    // Create the events in the background, and kill the operator while they are delivered.
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let creator = {
        let events = events.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..EVENTS)
                .map(|i| {
                    let events = events.clone();
                    async move {
                        let e: DocumentEvent = serde_json::from_value(json!({
                            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
                            "metadata": {"name": format!("doc-{i:03}")},
                            "spec": {"type": "document.completed", "data": {"document_id": i}}
                        }))
                        .unwrap();
                        events.create(&PostParams::default(), &e).await.map(|_| ())
                    }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
        })
    };
    eventually(
        "100 deliveries before the kill",
        Duration::from_secs(60),
        || async { (receiver.counts().0 >= 100).then_some(()) },
    )
    .await;
    first.child.start_kill().expect("SIGKILL sent");
    first.child.wait().await.unwrap();
    // The receiver counts a request on arrival, and the first operator is dead: at most a
    // request still in transit on loopback is counted after this.
    let at_kill = receiver.counts();
    assert!(
        (1..EVENTS).contains(&at_kill.0),
        "the test proves nothing unless the kill lands with deliveries outstanding: {} of {EVENTS} \
         had arrived at the kill; slow the receiver down or create more events",
        at_kill.0
    );

    let restarted = std::time::Instant::now();
    let second = args.start(cp);
    second.wait_ready().await;
    creator.await.unwrap().expect("every event created");
    eventually(
        "every event delivered after the restart",
        Duration::from_secs(120),
        || async { (receiver.counts().0 == EVENTS).then_some(()) },
    )
    .await;
    let (distinct, total) = receiver.counts();
    eprintln!(
        "FIGURES no_event_is_lost_when_the_operator_is_killed_mid_delivery: sent={EVENTS} \
         delivered={distinct} duplicates={} lost={} recover_s={:.1} delivered_before_kill={} \
         build=debug",
        total - distinct,
        EVENTS - distinct,
        restarted.elapsed().as_secs_f64(),
        at_kill.0,
    );
    // And the resources say so.
    eventually(
        "every DocumentEvent Delivered",
        Duration::from_secs(60),
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let delivered = list
                .items
                .iter()
                .filter(|e| e.status.as_ref().and_then(|s| s.phase) == Some(EventPhase::Delivered))
                .count();
            (delivered == EVENTS).then_some(())
        },
    )
    .await;
}
