//! The Kubernetes objects tests create, and the states they wait for: a signing Secret with a
//! Webhook (waited Ready), DocumentEvents, their phases, a Webhook's Ready reason, and RBAC
//! grants on hookrelay's resources for a ServiceAccount.

use std::time::Duration;

use kube::{Api, Client, api::PostParams};

use super::{eventually, receivers::CountingReceiver};

/// The timestamp of the document-processing contract's example events, given to the events
/// the harness creates or posts.
pub const EXAMPLE_TIMESTAMP: &str = "2023-06-15T10:35:00Z";

/// A Secret `<name>-secret` holding `secret`, and a Webhook `name` for every event type that
/// signs with it; waits until it is Ready.
pub async fn create_webhook(
    client: &Client,
    ns: &str,
    name: &str,
    url: &str,
    secret: &str,
    delivery: serde_json::Value,
) {
    let target = serde_json::json!({"url": url});
    create_webhook_to(client, ns, name, target, secret, delivery).await
}

/// [`create_webhook`] with the spec's target given as `{"url": ...}` or `{"serviceRef": ...}`.
pub async fn create_webhook_to(
    client: &Client,
    ns: &str,
    name: &str,
    target: serde_json::Value,
    secret: &str,
    delivery: serde_json::Value,
) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        // Labelled as a signing Secret: the operator reads no other.
        serde_json::json!({"metadata": {"name": format!("{name}-secret"), "labels": {"hookrelay.dev/signing-secret": "true"}}, "stringData": {"secret": secret}}),
    )
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    let mut spec = serde_json::json!({
        "events": ["*"], "secretRef": {"name": format!("{name}-secret")}, "delivery": delivery
    });
    for (field, value) in target.as_object().expect("a target object") {
        spec[field] = value.clone();
    }
    let w: hookrelay::crd::Webhook = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap();
    webhooks.create(&PostParams::default(), &w).await.unwrap();
    wait_ready(&webhooks, name).await;
}

/// Waits (up to 60 s) until the Webhook `name` is Ready.
pub async fn wait_ready(webhooks: &Api<hookrelay::crd::Webhook>, name: &str) {
    eventually(
        &format!("webhook {name} Ready"),
        Duration::from_secs(60),
        || async {
            let w = webhooks.get(name).await.ok()?;
            w.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

/// A counting receiver and a Ready Webhook `name` for every event type that delivers to it.
pub async fn counting_webhook(
    client: &Client,
    ns: &str,
    name: &str,
    secret: &str,
) -> CountingReceiver {
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        client,
        ns,
        name,
        &format!("http://{addr}/h"),
        secret,
        serde_json::json!({}),
    )
    .await;
    receiver
}

/// A DocumentEvent with the contract's example timestamp.
pub async fn create_event(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    data: serde_json::Value,
) {
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), ns);
    let e: hookrelay::crd::DocumentEvent = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent", "metadata": {"name": name},
        "spec": {"type": type_, "timestamp": EXAMPLE_TIMESTAMP, "data": data}
    }))
    .unwrap();
    events.create(&PostParams::default(), &e).await.unwrap();
}

/// Waits until the DocumentEvent reaches `phase`.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: &str,
) -> hookrelay::crd::DocumentEvent {
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{name} phase {phase}"),
        Duration::from_secs(60),
        || async {
            let e = events.get(name).await.ok()?;
            let p = serde_json::to_value(e.status.as_ref()?.phase?).ok()?;
            (p == phase).then_some(e)
        },
    )
    .await
}

/// Waits until the Webhook's Ready condition has `status` and `reason` for its current
/// generation; returns the condition's message.
pub async fn wait_ready_reason(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> String {
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("webhook {name} Ready={status}/{reason}"),
        Duration::from_secs(60),
        || async {
            let w = webhooks.get(name).await.ok()?;
            let generation = w.metadata.generation;
            let c = w
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.status == status && c.reason == reason && c.observed_generation == generation)
                .then_some(c.message)
        },
    )
    .await
}

/// Every verb on hookrelay's resources (webhooks, documentevents) in `namespace` for the
/// ServiceAccount `sa_namespace`/`sa`: a Role and RoleBinding named `{sa_namespace}-{sa}`.
pub async fn grant_hookrelay(client: &Client, namespace: &str, sa_namespace: &str, sa: &str) {
    grant(
        client,
        namespace,
        (sa_namespace, sa),
        &["webhooks", "documentevents"],
        &["*"],
    )
    .await;
}

/// A Role and RoleBinding in `namespace` that let the ServiceAccount `sa` (namespace, name) do
/// `verbs` on hookrelay's `resources` there.
pub async fn grant(
    client: &Client,
    namespace: &str,
    (sa_namespace, sa): (&str, &str),
    resources: &[&str],
    verbs: &[&str],
) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let name = format!("{sa_namespace}-{sa}");
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["hookrelay.dev"], "resources": resources, "verbs": verbs}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// Sets `spec.paused` of the Webhook `name`.
pub async fn set_paused(client: &Client, ns: &str, name: &str, paused: bool) {
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    webhooks
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"paused": paused}})),
        )
        .await
        .unwrap();
}
