//! `helm install` of the chart's defaults (with the image built here) in durable and JetStream
//! mode: the Pods are admitted under the restricted Pod Security profile and Ready, a Webhook to
//! a receiver Pod shows Ready in `kubectl get wh`, a Pod of another namespace posts events to the
//! ingest Service by DNS name with a projected token (and one without rights gets 403), the
//! events arrive signed, the page and `/metrics` answer through the Services, and `helm test`
//! passes, and fails once no operator Pod runs.

use std::time::Duration;

use serde_json::json;

use crate::{
    harness::{
        IMAGE, Namespaces, PodReceiver, Release, TAG, cluster, get_from_pod, one_at_a_time,
        post_from_pod, ready_column, receiving_webhook,
    },
    support::grant_hookrelay,
};

#[tokio::test]
async fn a_durable_install_runs_restricted_pods_takes_events_from_pods_and_passes_helm_test() {
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay", "docs"]).await;
    let release = Release::install(ns.get(0), "hookrelay", &[]).await;
    assert_runs_restricted(&release, 1).await;
    let receiver = receiving_webhook(ns.get(1), "billing", SECRET).await;
    assert_eq!(ready_column(ns.get(1), "billing").await, "True");

    let reply = ingest_from_pods(&release, ns.get(1), &receiver).await;
    // Durable: the reply names the DocumentEvent it stored.
    let stored = reply["document_events"][0]
        .as_str()
        .unwrap_or_else(|| panic!("the reply names the stored event: {reply}"));
    cluster()
        .kubectl_ok(&["get", "documentevent", "-n", ns.get(1), stored], None)
        .await;

    page_and_metrics(&release, ns.get(1)).await;

    let passed = release.helm_test().await;
    assert!(
        passed.success,
        "helm test: {}{}",
        passed.stdout, passed.stderr
    );
    cluster()
        .kubectl_ok(
            &[
                "scale",
                "deployment",
                &release.name,
                "-n",
                &release.namespace,
                "--replicas=0",
            ],
            None,
        )
        .await;
    cluster()
        .kubectl_ok(
            &[
                "wait",
                "--for=delete",
                "pod",
                "-n",
                &release.namespace,
                "-l",
                "app.kubernetes.io/component!=test",
                "--timeout=90s",
            ],
            None,
        )
        .await;
    let failed = release.helm_test().await;
    assert!(
        !failed.success,
        "helm test passes with no operator Pod: {}",
        failed.stdout
    );
}

#[tokio::test]
async fn a_jetstream_install_with_nats_in_the_cluster_takes_events_from_pods_and_delivers_them() {
    let _one = one_at_a_time().await;
    let ns = Namespaces::create(&["hookrelay-js", "apps"]).await;
    let nats = crate::harness::start_nats(ns.get(0)).await;
    let release = Release::install(
        ns.get(0),
        "hookrelay",
        &["config.ingestMode=jetstream", &format!("nats.url={nats}")],
    )
    .await;
    assert_runs_restricted(&release, 1).await;
    let receiver = receiving_webhook(ns.get(1), "billing", SECRET).await;
    assert_eq!(ready_column(ns.get(1), "billing").await, "True");
    let reply = ingest_from_pods(&release, ns.get(1), &receiver).await;
    assert_eq!(
        reply["accepted"], 1,
        "JetStream stored the one event: {reply}"
    );
    page_and_metrics(&release, ns.get(1)).await;
}

/// The release's Pods: `replicas` of them, Ready, running the image built here as UID 65532 with
/// the restricted profile's settings (which the namespace also enforces at admission).
async fn assert_runs_restricted(release: &Release, replicas: usize) {
    let pods = release.pods().await;
    assert_eq!(pods.len(), replicas, "{} Pods", pods.len());
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.expect("a spec");
        let pod_security = spec.security_context.expect("a Pod securityContext");
        assert_eq!(pod_security.run_as_user, Some(65532), "{name}");
        assert_eq!(pod_security.run_as_non_root, Some(true), "{name}");
        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some(format!("{IMAGE}:{TAG}").as_str())
        );
        let security = container
            .security_context
            .clone()
            .expect("a securityContext");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{name}");
        let ready = pod
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{name} is Ready");
    }
}

const SECRET: &str = "install-signing-secret";

/// From Pods of `namespace`: one event posted with the token of a ServiceAccount that may create
/// events there (202, then delivered, signed), one with a ServiceAccount without rights (403,
/// never delivered). The 202 reply.
async fn ingest_from_pods(
    release: &Release,
    namespace: &str,
    receiver: &PodReceiver,
) -> serde_json::Value {
    let url = format!("{}/api/events?namespace={namespace}", release.url("", 8080));
    for sa in ["emitter", "stranger"] {
        cluster()
            .kubectl_ok(&["create", "serviceaccount", sa, "-n", namespace], None)
            .await;
    }
    grant_hookrelay(&cluster().client().await, namespace, namespace, "emitter").await;
    let event =
        |seq: u64| json!({"event": "document.completed", "data": {"document_id": 123, "seq": seq}});
    let (status, reply) = post_from_pod(namespace, "emit", "emitter", &url, &event(1)).await;
    assert_eq!(status, 202, "{reply}");
    let (refused, why) = post_from_pod(namespace, "stray", "stranger", &url, &event(2)).await;
    assert_eq!(refused, 403, "{why}");

    let received = receiver.wait_for(1, Duration::from_secs(60)).await;
    assert!(received.refused.is_empty(), "{:?}", received.refused);
    // The refused event never arrives: give it the time the first one took, and more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = receiver.received().await;
    let seqs: Vec<u64> = received.seqs().into_keys().collect();
    assert_eq!(seqs, [1]);
    assert_eq!(received.deliveries[0].1["data"]["document_id"], 123);
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("a JSON reply ({e}): {reply}"))
}

/// The page and `/metrics`, fetched by a Pod through the release's two Services.
async fn page_and_metrics(release: &Release, namespace: &str) {
    let page = get_from_pod(namespace, "page", &format!("{}/ui/", release.url("", 8080))).await;
    assert!(page.contains("<html"), "the page: {page:.300}");
    let metrics = get_from_pod(
        namespace,
        "metrics",
        &format!("{}/metrics", release.url("-metrics", 9090)),
    )
    .await;
    assert!(
        metrics.contains("hookrelay_delivery_attempts_total{"),
        "/metrics: {metrics:.300}"
    );
}
