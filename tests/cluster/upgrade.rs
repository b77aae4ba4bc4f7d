//! `helm upgrade` to a new image tag and changed values while events keep coming: the Pods roll,
//! the Lease passes from one Pod to the next, and no event is lost.

use std::time::{Duration, Instant};

use crate::{
    harness::{
        IMAGE, LeaseWatch, Namespaces, Release, Tally, UPGRADE_TAG, one_at_a_time,
        receiving_webhook, steady_load,
    },
    support::eventually,
};

const SECRET: &str = "upgrade-signing-secret";
const EVENTS: u64 = 400;
const PER_SECOND: u64 = 20;

#[tokio::test]
async fn helm_upgrade_to_a_new_image_and_values_under_load_loses_no_event() {
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay-up", "docs"]).await;
    let release = Release::install(ns.get(0), "hookrelay", &["replicaCount=2"]).await;
    let receiver = receiving_webhook(ns.get(1), "all", SECRET).await;
    let before = release.pod_names().await;
    eventually("a leader", Duration::from_secs(60), || release.leader()).await;
    let lease = LeaseWatch::start(&release);

    let load = steady_load(ns.get(1), EVENTS, PER_SECOND);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    release
        .upgrade(&[
            &format!("image.tag={UPGRADE_TAG}"),
            "config.logFormat=text",
            "config.maxInFlight=256",
        ])
        .await;
    let upgraded = started.elapsed();
    let sent = load.await.expect("the load");
    let received = receiver
        .wait_for(sent as usize, Duration::from_secs(120))
        .await;
    let tally = Tally::of(sent, &received);
    let holders = lease.holders();
    eprintln!(
        "FIGURES upgrade: {tally} helm_upgrade_s={:.1} samples_without_holder={} holders={holders:?}",
        upgraded.as_secs_f64(),
        lease.without_holder()
    );
    assert_eq!(tally.lost, 0, "{tally:?}");
    assert!(received.refused.is_empty(), "{:?}", received.refused);

    let after = release.pods().await;
    assert_eq!(after.len(), 2);
    for pod in &after {
        let name = pod.metadata.name.clone().unwrap_or_default();
        assert!(!before.contains(&name), "{name} was not replaced");
        let container = &pod.spec.as_ref().expect("a spec").containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some(format!("{IMAGE}:{UPGRADE_TAG}").as_str())
        );
        let args = container.args.clone().unwrap_or_default();
        for flag in ["--log-format=text", "--max-in-flight=256"] {
            assert!(
                args.iter().any(|a| a == flag),
                "{name} runs with {flag}: {args:?}"
            );
        }
    }
    // One holder at a time, each an operator Pod of the release, the last one a new Pod.
    let after: Vec<String> = after.into_iter().filter_map(|p| p.metadata.name).collect();
    for holder in holders.iter().flatten() {
        assert!(
            before.contains(holder) || after.contains(holder),
            "{holder} is not a Pod of the release"
        );
    }
    let last = holders.iter().rev().flatten().next().expect("a holder");
    assert!(
        after.contains(last),
        "the Lease ends with {last}, not a new Pod"
    );
}
