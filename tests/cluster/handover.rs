//! Two replicas of the chart under steady load: deleting the Pod that leads hands the Lease to
//! the other, the deleted Pod drains and exits within its termination grace period, and no event
//! is lost.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::{
    harness::{
        LeaseWatch, Namespaces, Release, Tally, cluster, one_at_a_time, receiving_webhook,
        steady_load,
    },
    support::eventually,
};

const SECRET: &str = "handover-signing-secret";
const EVENTS: u64 = 300;
const PER_SECOND: u64 = 20;
/// The chart's default `terminationGracePeriodSeconds`.
const GRACE: Duration = Duration::from_secs(35);

#[tokio::test]
async fn deleting_the_leading_pod_mid_load_hands_over_the_lease_drains_in_grace_and_loses_no_event()
{
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay-ha", "docs"]).await;
    let release = Release::install(ns.get(0), "hookrelay", &["replicaCount=2"]).await;
    let receiver = receiving_webhook(ns.get(1), "all", SECRET).await;
    let first = eventually("a leader", Duration::from_secs(60), || release.leader()).await;
    let lease = LeaseWatch::start(&release);

    let load = steady_load(ns.get(1), EVENTS, PER_SECOND);
    // A third of the way in, with deliveries in flight.
    tokio::time::sleep(Duration::from_millis(EVENTS * 1000 / PER_SECOND / 3)).await;
    let pods: Api<Pod> = Api::namespaced(cluster().client().await, &release.namespace);
    let exits = watch_exit(pods.clone(), first.clone());
    let deleted = Instant::now();
    cluster()
        .kubectl_ok(
            &[
                "delete",
                "pod",
                &first,
                "-n",
                &release.namespace,
                "--wait=false",
            ],
            None,
        )
        .await;
    let second = eventually("the Lease handed over", Duration::from_secs(60), || async {
        release.leader().await.filter(|l| *l != first)
    })
    .await;
    let handed_over = deleted.elapsed();
    let (gone, exit_code) = exits.await.expect("the exit watch");

    let sent = load.await.expect("the load");
    let received = receiver
        .wait_for(sent as usize, Duration::from_secs(120))
        .await;
    let tally = Tally::of(sent, &received);
    eprintln!(
        "FIGURES handover: {tally} lease_handed_over_s={:.1} samples_without_holder={} \
         deleted_pod_gone_s={:.1} grace_s={} exit_code={} holders={:?}",
        handed_over.as_secs_f64(),
        lease.without_holder(),
        gone.as_secs_f64(),
        GRACE.as_secs(),
        exit_code.map_or("unseen".to_owned(), |c| c.to_string()),
        lease.holders(),
    );
    assert_eq!(tally.lost, 0, "{tally:?}");
    assert!(received.refused.is_empty(), "{:?}", received.refused);
    let replacement = release.pod_names().await;
    assert!(replacement.contains(&second), "{second} in {replacement:?}");
    assert!(
        gone < GRACE - Duration::from_secs(5),
        "the deleted Pod took {gone:?}: it was killed at the end of its grace period, not drained"
    );
    assert_ne!(exit_code, Some(137), "SIGKILLed");
}

/// Watches Pod `name` until it is gone: how long that took, and its container's exit code if
/// a status showed one before the Pod went.
fn watch_exit(pods: Api<Pod>, name: String) -> tokio::task::JoinHandle<(Duration, Option<i32>)> {
    let start = Instant::now();
    tokio::spawn(async move {
        let mut exit_code = None;
        loop {
            match pods.get_opt(&name).await {
                Ok(None) => return (start.elapsed(), exit_code),
                Ok(Some(pod)) => {
                    let terminated = pod
                        .status
                        .and_then(|s| s.container_statuses)
                        .and_then(|c| c.first().and_then(|c| c.state.clone()))
                        .and_then(|s| s.terminated);
                    if let Some(t) = terminated {
                        exit_code = Some(t.exit_code);
                    }
                }
                Err(_) => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{name} still there"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
