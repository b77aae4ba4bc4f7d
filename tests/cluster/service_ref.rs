//! `spec.serviceRef` on a real cluster, with no test seam: the operator Pod reaches receiver Pods
//! through their Services' ClusterIPs (kube-proxy), over plain http (with `config.allowHttp`) and
//! over https trusting the Webhook's `caBundle`; a Webhook cannot reach a Service of another
//! namespace.

use std::time::Duration;

use serde_json::json;

use crate::{
    harness::{Namespaces, PodReceiver, Release, cluster, one_at_a_time},
    support::{create_event, create_webhook_to, wait_ready_reason},
};

const SECRET: &str = "service-ref-secret";

#[tokio::test]
async fn service_refs_reach_receiver_pods_over_http_and_https_and_never_another_namespace() {
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay-sr", "team-a", "team-b"]).await;
    let (a, b) = (ns.get(1), ns.get(2));
    let _release = Release::install(ns.get(0), "hookrelay", &["config.allowHttp=true"]).await;
    let client = cluster().client().await;

    let plain = PodReceiver::start(a, "plain", SECRET, false).await;
    let secure = PodReceiver::start(a, "secure", SECRET, true).await;
    for receiver in [&plain, &secure] {
        let target = json!({"serviceRef": receiver.service_ref()});
        create_webhook_to(&client, a, &receiver.name, target, SECRET, json!({})).await;
    }

    // team-b names team-a's Service: a serviceRef only ever means its own namespace's Service.
    let stray = json!({"serviceRef": {"name": "plain", "port": "http"}});
    let manifest = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stray-secret", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET},
    });
    crate::harness::apply(b, &manifest).await;
    let webhook = json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "stray"},
        "spec": {"serviceRef": stray["serviceRef"], "events": ["*"], "secretRef": {"name": "stray-secret"}},
    });
    crate::harness::apply(b, &webhook).await;
    let why = wait_ready_reason(&client, b, "stray", "False", "ServiceNotFound").await;
    assert!(why.contains("plain"), "{why}");
    // And a name that tries to leave the namespace is refused at admission.
    let mut leaving = webhook.clone();
    leaving["metadata"]["name"] = json!("leaving");
    leaving["spec"]["serviceRef"]["name"] = json!(format!("plain.{a}"));
    let refused = cluster()
        .kubectl(&["apply", "-n", b, "-f", "-"], Some(&leaving.to_string()))
        .await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("must be a Service name"),
        "{}",
        refused.stderr
    );

    create_event(
        &client,
        b,
        "from-b",
        "document.completed",
        json!({"seq": 2}),
    )
    .await;
    create_event(
        &client,
        a,
        "from-a",
        "document.completed",
        json!({"seq": 1}),
    )
    .await;
    for receiver in [&plain, &secure] {
        let received = receiver.wait_for(1, Duration::from_secs(60)).await;
        assert!(received.refused.is_empty(), "{:?}", received.refused);
    }
    // team-b's event had the time team-a's took, and more: it reached neither.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for receiver in [&plain, &secure] {
        let seqs: Vec<u64> = receiver.received().await.seqs().into_keys().collect();
        assert_eq!(seqs, [1], "{}", receiver.name);
    }
}
