//! The delivery log page in a real browser: headless Debian chromium driven by
//! tests/browser/page.py (Playwright for Python), against the operator on the real API server.
//! `hack/browser.sh` installs the browser, the venv and axe-core.

use std::{path::PathBuf, time::Duration};

use axum::{Router, http::StatusCode, routing::post};
use serde_json::Value;

use crate::support::{
    InProcess, api_call, control_plane, eventually, repo_root, wait_phase, wait_ready_reason,
};

/// What the failing receiver answers and the Webhook's description hold: shown as text, it
/// must never become an element (window.__xss stays undefined).
const XSS: &str = "<img src=x onerror=window.__xss=1>";

/// A receiver that fails every delivery with HTML in its answer.
async fn failing_receiver() -> std::net::SocketAddr {
    let app = Router::new().route(
        "/h",
        post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, format!("broken: {XSS}")) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// What page.py writes, and what docs/screenshots holds.
const SCREENSHOTS: [&str; 5] = [
    "webhooks-list.png",
    "webhook-page.png",
    "webhook-page-375px.png",
    "unauthorized.png",
    "forbidden.png",
];

fn browser_python() -> PathBuf {
    let python = repo_root().join("tests/browser/.venv/bin/python");
    assert!(
        python.exists()
            && repo_root()
                .join("tests/browser/node_modules/axe-core")
                .exists(),
        "the browser test needs hack/browser.sh run once (chromium, Playwright, axe-core)"
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_uses_the_delivery_log_page_in_chromium() {
    let python = browser_python();
    let cp = control_plane();
    let ns = cp.namespace("webpage").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let api = op.op.listen_addr;
    let receiver = failing_receiver().await;

    // The Webhook as a person creates it: kubectl, with one attempt per delivery so that the
    // event's delivery fails for good at once.
    let manifest = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"failing-secret","labels":{{"hookrelay.dev/signing-secret":"true"}}}},"stringData":{{"secret":"a-signing-secret-for-the-page-test"}}}},
{{"apiVersion":"hookrelay.dev/v1alpha1","kind":"Webhook","metadata":{{"name":"failing"}},"spec":{{"url":"http://{receiver}/h","events":["*"],"description":"answers {XSS}","secretRef":{{"name":"failing-secret"}},"delivery":{{"maxAttempts":1}}}}}}]}}"#
    );
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        .await;
    wait_ready_reason(&client, &ns, "failing", "True", "Routed").await;
    cp.kubectl_ok(
        &["create", "-n", &ns, "-f", "-"],
        Some(
            r#"{"apiVersion":"hookrelay.dev/v1alpha1","kind":"DocumentEvent","metadata":{"name":"doc-42"},
               "spec":{"type":"document.error","data":{"document_id":42,"filename":"a.pdf"}}}"#,
        ),
    )
    .await;
    wait_phase(&client, &ns, "doc-42", "Failed").await;

    let token = cp.hookrelay_token(&ns, "page-viewer").await;
    // A read-only token (what the README suggests for support people): actions answer 403.
    let reader = cp.service_account_token(&ns, "page-reader").await;
    cp.kubectl_ok(
        &[
            "create",
            "role",
            "page-reader",
            "-n",
            &ns,
            "--verb=get,list",
            "--resource=webhooks.hookrelay.dev,documentevents.hookrelay.dev",
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            "page-reader",
            "-n",
            &ns,
            "--role=page-reader",
            &format!("--serviceaccount={ns}:page-reader"),
        ],
        None,
    )
    .await;
    let deliveries_path = format!("/api/webhooks/failing/deliveries?namespace={ns}");
    let failed_delivery = eventually(
        "the failed delivery of doc-42 in the Webhook's history",
        Duration::from_secs(30),
        || async {
            let (status, body) = api_call(api, "GET", &deliveries_path, Some(&token), None).await;
            (status == 200).then_some(())?;
            body["deliveries"]
                .as_array()?
                .iter()
                .find(|d| d["source"] == "doc-42" && d["outcome"] == "Failed")
                .and_then(|d| d["id"].as_str().map(str::to_owned))
        },
    )
    .await;

    let shots =
        std::env::temp_dir().join(format!("hookrelay-webpage-{}-{}", std::process::id(), ns));
    let output = tokio::process::Command::new(&python)
        .arg(repo_root().join("tests/browser/page.py"))
        .args(["--base", &format!("http://{api}")])
        .args(["--token", &token])
        .args(["--namespace", &ns])
        .args(["--webhook", "failing"])
        .args(["--failed-delivery", &failed_delivery])
        .args(["--readonly-token", &reader])
        .args(["--xss", XSS])
        .arg("--screenshots")
        .arg(&shots)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("page.py finishes within 5 minutes")
        .expect("page.py starts");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{log}");
    assert!(
        output.status.success(),
        "page.py failed ({}), screenshots in {}:\n{log}",
        output.status,
        shots.display()
    );
    assert!(log.contains("page.py: every step passed"), "{log}");
    for shot in SCREENSHOTS {
        let png = std::fs::read(shots.join(shot)).unwrap_or_else(|e| panic!("{shot}: {e}"));
        assert!(png.starts_with(b"\x89PNG") && png.len() > 2000, "{shot}");
    }
    // HOOKRELAY_SCREENSHOTS=docs/screenshots keeps them (how the committed ones are made).
    if let Ok(keep) = std::env::var("HOOKRELAY_SCREENSHOTS") {
        let keep = repo_root().join(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for shot in SCREENSHOTS {
            std::fs::copy(shots.join(shot), keep.join(shot)).unwrap();
        }
    }

    // What the page did, it did through the API: a test delivery and a redelivery are in the
    // history, and the Webhook ends resumed.
    let (status, body) = api_call(api, "GET", &deliveries_path, Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    let sources: Vec<&Value> = body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["source"])
        .collect();
    assert!(sources.contains(&&Value::from("test")), "{body}");
    assert!(sources.contains(&&Value::from("redeliver")), "{body}");
    let paused = cp
        .kubectl_ok(
            &[
                "get",
                "webhook",
                "failing",
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.paused}",
            ],
            None,
        )
        .await;
    assert_eq!(paused.trim(), "false");
    let _ = std::fs::remove_dir_all(&shots);
    op.stop().await;
}
