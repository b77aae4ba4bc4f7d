//! The README's quick start, run command by command as it is written, on the cluster, with the
//! image built here under the chart's default name: the receiver's log ends with a verified
//! delivery of the event. Then every manifest of `examples/`, as written, on the same cluster:
//! each Webhook becomes Ready and delivers to the quick start's receiver, and the ingest Job
//! posts its event with its projected token.

use std::time::Duration;

use crate::{
    harness::{Namespaces, Release, cluster, one_at_a_time, what_the_operator_saw},
    support::{examples, repo_root, within},
};

/// The commands of the `nth` sh block of the README's "Quick start on a cluster", in order:
/// the first makes a delivery, the second opens the page.
fn quick_start_commands(nth: usize) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split_once("\n## Quick start on a cluster\n")
        .expect("a 'Quick start on a cluster' section")
        .1;
    let section = section.split("\n## ").next().unwrap_or_default();
    let block = section
        .split("```sh\n")
        .nth(nth + 1)
        .and_then(|rest| rest.split_once("```"))
        .unwrap_or_else(|| panic!("sh block {nth} of the quick start"))
        .0;
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The chart README's command that adopts existing CRDs for the release `release` in
/// `namespace` (its upgrade notes).
fn chart_readme_adoption(release: &str, namespace: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("charts/hookrelay/README.md"))
        .expect("charts/hookrelay/README.md");
    readme
        .lines()
        .find(|l| l.starts_with("kubectl label crd "))
        .expect("the chart README's adoption command")
        .replace("$RELEASE", release)
        .replace("$NAMESPACE", namespace)
}

/// Runs `command` with bash from the repository's root, kubectl and helm of the cluster first
/// on the PATH: (succeeded, stdout and stderr).
async fn shell(command: &str) -> (bool, String) {
    let path = format!(
        "{}:{}",
        cluster().bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", command])
        .current_dir(repo_root())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .env("PATH", path)
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_readme_quick_start_runs_as_written_and_ends_with_a_verified_delivery() {
    let _one = one_at_a_time().await;
    let commands = quick_start_commands(0);
    assert!(commands.len() >= 8, "{commands:?}");
    assert!(
        commands[0].starts_with("helm install hookrelay"),
        "{commands:?}"
    );
    // The quick start's namespaces have fixed names: an earlier run's may still be going.
    for namespace in ["hookrelay", "docs"] {
        let gone = within(Duration::from_secs(120), || async {
            let out = cluster()
                .kubectl(&["get", "namespace", namespace], None)
                .await;
            (!out.success).then_some(())
        })
        .await;
        assert!(gone.is_some(), "namespace {namespace} is still there");
    }
    // On a new cluster the quick start's `helm install` installs the CRDs. Here the harness
    // applied them for the other tests' releases (which render none): adopted for the release
    // `hookrelay` in `hookrelay` with the chart README's command, they are as that install would
    // find them on a cluster where it had run before, and it upgrades them.
    let adoption = chart_readme_adoption("hookrelay", "hookrelay");
    let (ok, output) = shell(&adoption).await;
    assert!(ok, "{adoption}\n{output}");
    // What the quick start makes, removed however the test ends.
    let _made = (
        Namespaces::adopt(&["hookrelay", "docs"]),
        Release {
            name: "hookrelay".into(),
            namespace: "hookrelay".into(),
        },
    );
    let (last, steps) = commands.split_last().expect("commands");
    let started = std::time::Instant::now();
    for command in steps {
        let step = std::time::Instant::now();
        let (ok, output) = shell(command).await;
        assert!(ok, "{command}\n{output}");
        // How long a newcomer waits at each step (the figures of the walk-through).
        eprintln!(
            "$ {command}   [{:.1} s]\n{output}",
            step.elapsed().as_secs_f64()
        );
    }
    assert!(
        last.starts_with("kubectl logs"),
        "the quick start ends with the receiver's log: {last}"
    );
    let verified = within(Duration::from_secs(60), || async {
        let (ok, output) = shell(last).await;
        let line = output
            .lines()
            .find(|l| ok && l.contains(r#""verified":true"#))
            .map(str::to_owned);
        if line.is_none() {
            tokio::time::sleep(Duration::from_millis(450)).await;
        }
        line
    })
    .await;
    let Some(line) = verified else {
        let (_, log) = shell(last).await;
        panic!(
            "no verified delivery in the receiver's log after 60 s:\n{log}\n{}",
            what_the_operator_saw().await
        );
    };
    eprintln!(
        "$ {last}\n{line}\nthe quick start, install to a verified delivery: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let delivery: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(delivery["event"], "document.completed");
    assert_eq!(delivery["webhook_signature"], true, "whsec_: both schemes");
    assert_eq!(
        delivery["body"]["data"]["filename"],
        "important_document.pdf"
    );
    assert_eq!(delivery["path"], "/webhooks/documents");

    the_page_shows_it_with_the_readmes_token().await;
    the_examples_run_as_written_with_the_quick_starts_receiver(last).await;
}

/// The README's second block: a token of a ServiceAccount bound to `view`, and a port-forward
/// to the API, through which the page and the Webhooks it lists are served.
async fn the_page_shows_it_with_the_readmes_token() {
    let commands = quick_start_commands(1);
    let (forward, setup) = commands.split_last().expect("commands");
    assert!(forward.starts_with("kubectl port-forward"), "{commands:?}");
    let mut token = String::new();
    for command in setup {
        let (ok, output) = shell(command).await;
        assert!(ok, "{command}\n{output}");
        if command.starts_with("kubectl create token") {
            token = output.trim().to_owned();
        }
    }
    assert!(token.starts_with("ey"), "a token: {token}");
    // The README's local port, unless another process here has it.
    let port = crate::support::free_port();
    let forward = forward.replace("8080:8080", &format!("{port}:8080"));
    let path = format!(
        "{}:{}",
        cluster().bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let _forwarding = tokio::process::Command::new("bash")
        .args(["-c", &format!("exec {forward}")])
        .env("KUBECONFIG", &cluster().kubeconfig)
        .env("PATH", path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl port-forward starts");
    // reqwest is built without a TLS provider of its own; plain http needs one installed all the same.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let page = within(Duration::from_secs(30), || async {
        let reply = client.get(format!("{base}/ui/")).send().await.ok()?;
        let ok = reply.status().is_success();
        let text = reply.text().await.ok()?;
        if !ok {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        ok.then_some(text)
    })
    .await
    .expect("the page through the port-forward within 30 s");
    assert!(page.contains("<html"), "{page}");
    // What the page asks for with the token: the Webhooks of docs, the quick start's among them.
    let reply = client
        .get(format!("{base}/api/webhooks?namespace=docs"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(reply.status(), 200);
    let listed: serde_json::Value = serde_json::from_str(&reply.text().await.unwrap()).unwrap();
    let receiver = listed["webhooks"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["id"] == "receiver").cloned())
        .unwrap_or_else(|| panic!("the quick start's Webhook listed: {listed}"));
    assert_eq!(receiver["ready"], true, "{receiver}");
    assert!(receiver["last_delivery_at"].is_string(), "{receiver}");
    // The same token may read, not write: `view` gives no more.
    let refused = client
        .delete(format!("{base}/api/v1/webhooks/receiver?namespace=docs"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(refused.status(), 403);
}

/// Applies every example as its comments say, in the quick start's namespace `docs`: the
/// Webhooks first, then (once they are Ready) what makes events; every event reaches every
/// Webhook that subscribes to it, signed, and `kubectl wait` sees each event Delivered.
async fn the_examples_run_as_written_with_the_quick_starts_receiver(receiver_log: &str) {
    let examples = examples();
    let run = |command: String| async move {
        let (ok, output) = shell(&command).await;
        assert!(ok, "{command}\n{output}\n{}", what_the_operator_saw().await);
        eprintln!("$ {command}\n{output}");
        output
    };
    for example in examples.iter().filter(|e| !e.emits) {
        run(format!(
            "kubectl {} -n docs -f {}",
            example.verb,
            example.relative()
        ))
        .await;
    }
    run("kubectl wait -n docs --for=condition=Ready webhook/file-conversion webhook/audit-log webhook/document-sync webhook/billing --timeout=60s".into()).await;
    for example in examples.iter().filter(|e| e.emits) {
        run(format!(
            "kubectl {} -n docs -f {}",
            example.verb,
            example.relative()
        ))
        .await;
    }
    run("kubectl wait -n docs --for=condition=Complete job/emit-uploaded --timeout=120s".into())
        .await;
    let emitted = run("kubectl logs -n docs job/emit-uploaded".into()).await;
    assert!(emitted.contains(r#""accepted":1"#), "{emitted}");

    // Where each event must arrive: (path, event type, document id).
    let mut expected = Vec::new();
    for (path, types) in [
        (
            "/webhooks/file-conversion",
            &["document.completed", "document.error"][..],
        ),
        (
            "/webhooks/audit",
            &["document.completed", "document.error", "document.uploaded"],
        ),
        (
            "/webhooks/document-sync",
            &["document.completed", "document.error", "document.uploaded"],
        ),
        ("/webhooks/billing", &["document.completed"]),
        (
            "/webhooks/documents",
            &["document.error", "document.uploaded"],
        ),
    ] {
        for event in types {
            let document = match *event {
                "document.completed" => 123,
                "document.error" => 124,
                _ => 125,
            };
            expected.push((path, *event, document));
        }
    }
    let arrived = within(Duration::from_secs(90), || async {
        let (_, log) = shell(receiver_log).await;
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(path, event, document)| {
                !lines.iter().any(|l| {
                    l["path"] == *path
                        && l["event"] == *event
                        && l["body"]["data"]["document_id"] == *document
                        && l["verified"] == true
                })
            })
            .collect();
        if missing.is_empty() {
            Some(lines)
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    })
    .await;
    let Some(lines) = arrived else {
        let (_, log) = shell(receiver_log).await;
        panic!(
            "not every example event reached every subscribed Webhook, verified:\n{log}\n{}",
            what_the_operator_saw().await
        );
    };
    assert!(
        lines.iter().all(|l| l["verified"] == true),
        "every delivery verifies: {lines:?}"
    );
    run("kubectl wait -n docs --for=condition=Delivered documentevents --all --timeout=60s".into())
        .await;
}
