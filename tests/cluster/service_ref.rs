//! `spec.serviceRef` on a real cluster, with no test seam: the operator Pod (in direct mode, the
//! events posted by Pods) reaches receiver Pods through their Services' ClusterIPs (kube-proxy),
//! over plain http (with `config.allowHttp`) and over https trusting only the Webhook's
//! `caBundle`; a Webhook cannot reach a Service of another namespace.

use std::time::Duration;

use hookrelay::crd::Webhook;
use kube::Api;
use serde_json::json;

use crate::{
    harness::{Namespaces, PodReceiver, Release, apply, cluster, one_at_a_time, post_from_pod},
    support::{create_webhook_to, eventually, grant_hookrelay, wait_ready_reason},
};

const SECRET: &str = "service-ref-secret";

#[tokio::test]
async fn service_refs_reach_receiver_pods_over_http_and_https_and_never_another_namespace() {
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay-sr", "team-a", "team-b"]).await;
    let (a, b) = (ns.get(1), ns.get(2));
    let release = Release::install(
        ns.get(0),
        "hookrelay",
        &["config.allowHttp=true", "config.ingestMode=direct"],
    )
    .await;
    let client = cluster().client().await;

    let plain = PodReceiver::start(a, "plain", SECRET, false).await;
    let secure = PodReceiver::start(a, "secure", SECRET, true).await;
    for (receiver, scheme) in [(&plain, "http"), (&secure, "https")] {
        let target = json!({"serviceRef": receiver.service_ref()});
        create_webhook_to(&client, a, &receiver.name, target, SECRET, json!({})).await;
        let routed = wait_ready_reason(&client, a, &receiver.name, "True", "Routed").await;
        let url = format!("{scheme}://{}.{a}.svc:8080/hooks", receiver.name);
        assert!(routed.contains(&url), "{routed}");
        // `kubectl get` shows the Service where a url Webhook shows its URL.
        let table = cluster()
            .kubectl_ok(&["get", "webhook", &receiver.name, "-n", a], None)
            .await;
        let at = table.find("SERVICE").expect("a SERVICE column");
        let row = table.lines().nth(1).unwrap_or_default();
        assert!(row[at..].starts_with(&receiver.name), "{table}");
    }
    // The same https Service under a caBundle that did not issue its certificate.
    let mut untrusted = secure.service_ref();
    untrusted["caBundle"] = json!(PodReceiver::unrelated_ca());
    let target = json!({"serviceRef": untrusted});
    let once = json!({"maxAttempts": 1});
    create_webhook_to(&client, a, "untrusted", target, SECRET, once).await;

    // team-b names team-a's Service: a serviceRef only ever means its own namespace's Service.
    let manifest = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stray-secret", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET},
    });
    apply(b, &manifest).await;
    let webhook = json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "stray"},
        "spec": {"serviceRef": {"name": "plain", "port": "http"}, "events": ["*"], "secretRef": {"name": "stray-secret"}},
    });
    apply(b, &webhook).await;
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

    // One event in each namespace, posted by a Pod of it to the ingest Service.
    for (namespace, seq) in [(b, 2), (a, 1)] {
        cluster()
            .kubectl_ok(
                &["create", "serviceaccount", "emitter", "-n", namespace],
                None,
            )
            .await;
        grant_hookrelay(&client, namespace, namespace, "emitter").await;
        let url = format!("{}/api/events?namespace={namespace}", release.url("", 8080));
        let event = json!({"event": "document.completed", "data": {"seq": seq}});
        let (status, reply) = post_from_pod(namespace, "emit", "emitter", &url, &event).await;
        assert_eq!(status, 202, "{reply}");
    }
    for receiver in [&plain, &secure] {
        let received = receiver.wait_for(1, Duration::from_secs(60)).await;
        assert!(received.refused.is_empty(), "{:?}", received.refused);
    }
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), a);
    let error = eventually(
        "the untrusted attempt recorded",
        Duration::from_secs(60),
        || async {
            webhooks
                .get("untrusted")
                .await
                .ok()?
                .status?
                .recent_deliveries
                .first()?
                .error
                .clone()
        },
    )
    .await;
    assert!(
        error.to_ascii_lowercase().contains("certificate"),
        "{error}"
    );
    // team-b's event, and the untrusted Webhook's, had the time team-a's took, and more: neither
    // reached a receiver.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for receiver in [&plain, &secure] {
        let received = receiver.received().await;
        assert_eq!(received.deliveries.len(), 1, "{}", receiver.name);
        let seqs: Vec<u64> = received.seqs().into_keys().collect();
        assert_eq!(seqs, [1], "{}", receiver.name);
    }
}
