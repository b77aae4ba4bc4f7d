//! Leader election with two operator processes: the standby serves the API but does not deliver;
//! when the leader is killed (SIGKILL) or stopped (SIGTERM) during a stream of DocumentEvents,
//! none is lost and the standby takes over. The figures are printed (README, "Several
//! replicas"); the bounds asserted are those of leader election: lease duration + retry period (+ margin)
//! after a kill, retry period (+ margin) after a SIGTERM, which releases the Lease.

use std::time::{Duration, Instant};

use hookrelay::crd::DocumentEvent;
use kube::{Api, api::PostParams};
use serde_json::json;

use crate::support::{
    CountingReceiver, OperatorArgs, api_call, control_plane, create_webhook, eventually, http_get,
};

const SECRET: &str = "a-signing-secret-for-leader-tests";
const LEASE: Duration = Duration::from_secs(6);
const RETRY: Duration = Duration::from_secs(1);
/// Scheduling, the first watch list of the new leader and the first attempt.
const MARGIN: Duration = Duration::from_secs(5);
const EVENTS: usize = 300;

enum Stop {
    Kill,
    Term,
}

struct Figures {
    takeover: Duration,
    delivered: usize,
    requests: usize,
    /// Delivered before the leader was stopped.
    delivered_before: usize,
}

async fn handover(stop: Stop) -> Figures {
    let cp = control_plane();
    let ns = cp
        .namespace(match stop {
            Stop::Kill => "lead-kill",
            Stop::Term => "lead-term",
        })
        .await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;

    let args = OperatorArgs::new(&ns).leader_elect().fast_lease();
    let mut leader = args.start(cp);
    leader.wait_leader(true).await;
    let standby = args.start(cp);
    standby.wait_ready().await;
    standby.wait_leader(false).await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/hook"),
        SECRET,
        json!({"initialBackoffSeconds": 1, "maxBackoffSeconds": 2}),
    )
    .await;

    // A standby serves the API, but what it would have to record itself goes to the leader.
    let (status, _) = http_get(
        standby.listen_addr,
        &format!("/api/webhooks/w?namespace={ns}"),
    )
    .await
    .expect("the standby's API answers");
    assert_eq!(status, 200, "a standby serves the REST API");
    let (status, body) = api_call(
        standby.listen_addr,
        "POST",
        &format!("/api/webhooks/w/test?namespace={ns}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_leader", "{body}");

    // The stream: 300 DocumentEvents, created while the leader is stopped.
    let creator = {
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(async move {
            let api: Api<DocumentEvent> = Api::namespaced(client, &ns);
            for i in 0..EVENTS {
                let e: DocumentEvent = serde_json::from_value(json!({
                    "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
                    "metadata": {"name": format!("ev-{i:03}")},
                    "spec": {"type": "document.completed", "data": {"document_id": i}},
                }))
                .unwrap();
                api.create(&PostParams::default(), &e).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually(
        "a third of the stream delivered",
        Duration::from_secs(60),
        || {
            let n = receiver.counts().0;
            async move { (n >= EVENTS / 3).then_some(()) }
        },
    )
    .await;
    let delivered_before = receiver.counts().0;
    assert!(
        delivered_before < EVENTS,
        "the leader must stop with events outstanding ({delivered_before} of {EVENTS} delivered)"
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get("hookrelay")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let holder_before = holder().await;
    assert!(!holder_before.is_empty(), "the leader holds the Lease");
    let stopped_at = Instant::now();
    match stop {
        Stop::Kill => leader.child.start_kill().expect("SIGKILL"),
        Stop::Term => {
            let pid = leader.child.id().expect("running").to_string();
            let kill = tokio::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .await
                .unwrap();
            assert!(kill.success());
        }
    }
    let exit = tokio::time::timeout(Duration::from_secs(60), leader.child.wait())
        .await
        .expect("the old leader ends")
        .unwrap();
    // SIGTERM releases the Lease on the way out (so the standby need not wait out the lease
    // duration); SIGKILL cannot.
    let holder_after = holder().await;
    match stop {
        Stop::Term => assert_ne!(
            holder_after, holder_before,
            "the Lease was not released by the stopped leader"
        ),
        Stop::Kill => assert!(
            holder_after == holder_before || stopped_at.elapsed() >= LEASE,
            "a killed leader's Lease changed hands before it expired"
        ),
    }
    // Requests the old leader had sent can still be read by the receiver for a moment.
    let settled = Instant::now().max(stopped_at + Duration::from_millis(200));
    standby.wait_leader(true).await;
    creator.await.unwrap();

    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    eventually(
        &format!(
            "all {EVENTS} events Delivered (standby log: {})",
            standby.log.display()
        ),
        Duration::from_secs(120),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            let delivered = list
                .items
                .iter()
                .filter(|e| {
                    e.status.as_ref().and_then(|s| s.phase)
                        == Some(hookrelay::crd::EventPhase::Delivered)
                })
                .count();
            (list.items.len() == EVENTS && delivered == EVENTS).then_some(())
        },
    )
    .await;
    assert_eq!(
        receiver.counts().0,
        EVENTS,
        "every event reached the receiver"
    );
    let first = receiver
        .first_after(settled)
        .expect("the standby delivered after the stop");
    let takeover = first.duration_since(stopped_at);
    let figures = Figures {
        takeover,
        delivered: receiver.counts().0,
        requests: receiver.counts().1,
        delivered_before,
    };
    let kind = match stop {
        Stop::Kill => "SIGKILL",
        Stop::Term => "SIGTERM",
    };
    println!(
        "leader {kind} with {delivered_before}/{EVENTS} delivered (exit {:?}): standby's first delivery {} ms after the stop; {} events delivered with {} requests ({} duplicates)",
        exit.code(),
        takeover.as_millis(),
        figures.delivered,
        figures.requests,
        figures.requests - figures.delivered
    );
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_event_and_the_standby_takes_over_after_the_lease() {
    let figures = handover(Stop::Kill).await;
    // The common FIGURES line (RELIABILITY.md): recover_s is the stop to the
    // standby's first delivery.
    eprintln!(
        "FIGURES killing_the_leader_loses_no_event_and_the_standby_takes_over_after_the_lease: sent={EVENTS} delivered={} duplicates={} lost={} recover_s={:.1} delivered_before_kill={} build=debug",
        figures.delivered,
        figures.requests - figures.delivered,
        EVENTS - figures.delivered,
        figures.takeover.as_secs_f64(),
        figures.delivered_before
    );
    assert_eq!(figures.delivered, EVENTS);
    // A bound of the election itself, not a performance target.
    assert!(
        figures.takeover <= LEASE + RETRY + MARGIN,
        "took {:?}, more than lease duration + retry period + {MARGIN:?}",
        figures.takeover
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_releases_the_lease_for_the_standby() {
    let figures = handover(Stop::Term).await;
    assert_eq!(figures.delivered, EVENTS);
    // Attempts being sent finish and every outcome is written before the Lease goes: the
    // standby sends nothing twice.
    assert_eq!(
        figures.requests, figures.delivered,
        "a graceful hand-over made duplicates"
    );
    assert!(
        figures.takeover <= RETRY + MARGIN,
        "took {:?}, more than the retry period + {MARGIN:?}: was the Lease released?",
        figures.takeover
    );
}
