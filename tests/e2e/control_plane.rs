//! The harness itself: admin access, and ServiceAccount tokens under RBAC.

use crate::support::control_plane;

#[tokio::test]
async fn service_account_tokens_work_and_rbac_decides() {
    let cp = control_plane();
    let ns = cp.namespace("rbac").await;
    let token = cp
        .service_account_token_without_audience(&ns, "reader")
        .await;
    let as_reader = cp.token_kubeconfig(&token);

    // Authenticated as the ServiceAccount, and nothing allowed yet.
    let whoami = cp
        .kubectl_as(
            &as_reader,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .await;
    assert_eq!(
        whoami.stdout,
        format!("system:serviceaccount:{ns}:reader"),
        "{}",
        whoami.stderr
    );
    let denied = cp
        .kubectl_as(&as_reader, &["get", "webhooks", "-n", &ns])
        .await;
    assert!(!denied.success);
    assert!(denied.stderr.contains("Forbidden"), "{}", denied.stderr);

    // RBAC objects grant exactly what they say.
    cp.kubectl_ok(
        &[
            "create",
            "role",
            "wh-reader",
            "--verb=get,list",
            "--resource=webhooks.hookrelay.dev",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            "wh-reader",
            "--role=wh-reader",
            &format!("--serviceaccount={ns}:reader"),
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    let allowed = cp
        .kubectl_as(&as_reader, &["get", "webhooks", "-n", &ns])
        .await;
    assert!(allowed.success, "{}", allowed.stderr);
    let still_denied = cp
        .kubectl_as(&as_reader, &["get", "documentevents", "-n", &ns])
        .await;
    assert!(
        still_denied.stderr.contains("Forbidden"),
        "{}",
        still_denied.stderr
    );

    // A bad token is not authenticated.
    let bogus = cp.token_kubeconfig("not-a-token");
    let unauthorized = cp.kubectl_as(&bogus, &["get", "webhooks", "-n", &ns]).await;
    assert!(
        unauthorized.stderr.contains("Unauthorized")
            || unauthorized.stderr.contains("provide credentials"),
        "{}",
        unauthorized.stderr
    );
}
