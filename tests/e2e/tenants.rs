//! Tenants who cannot harm each other: what a Webhook's author in one namespace can do to the
//! deliveries of another namespace, tried against the real API server in every ingest mode.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hookrelay::crd::Webhook;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::support::{
    CountingReceiver, INGEST_MODES, ModeOperator, control_plane, counting_webhook, eventually,
    wait_ready, wait_ready_reason,
};

const SECRET: &str = "a-strong-signing-secret-for-tenant-tests";

async fn set_filter(webhooks: &Api<Webhook>, name: &str, filter: &str) {
    webhooks
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"filter": filter}})),
        )
        .await
        .unwrap();
}

async fn delivered(receiver: &CountingReceiver, what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        (receiver.counts().0 >= 1).then_some(())
    })
    .await;
}

/// A counting Webhook `name` with `filter`, once that spec is reconciled and Ready.
async fn filtered_webhook(
    client: &kube::Client,
    webhooks: &Api<Webhook>,
    namespace: &str,
    name: &str,
    filter: &str,
) -> CountingReceiver {
    let receiver = counting_webhook(client, namespace, name, SECRET).await;
    set_filter(webhooks, name, filter).await;
    eventually("the filter reconciled", Duration::from_secs(60), || async {
        let w = webhooks.get(name).await.ok()?;
        let status = w.status?;
        (status.observed_generation == w.metadata.generation).then_some(())
    })
    .await;
    wait_ready(webhooks, name).await;
    receiver
}

/// Posts `large` to namespace `a`, then one small event to `b`, and waits until `b`'s event
/// reaches `other`: how long the large post took, and the small event from its post.
async fn large_then_other(
    op: &ModeOperator,
    (a, b): (&str, &str),
    large: &serde_json::Value,
    other: &CountingReceiver,
) -> (Duration, Duration) {
    let posted = Instant::now();
    op.post_event(a, "document.completed", large.clone()).await;
    let large_accepted = posted.elapsed();
    let other_posted = Instant::now();
    op.post_event(b, "document.completed", json!({"document_id": 1}))
        .await;
    delivered(other, "the other namespace's event").await;
    (large_accepted, other_posted.elapsed())
}

/// A filter that compares every element of one list of the event with every element of
/// another (`data.a.all(x, !(x in data.b))`), with one event of two lists of 120,000 numbers
/// (480 KB): once, it held the operator at full CPU and another namespace's event waited over
/// a minute. The API server refuses its plain form, and the operator any form when the Webhook
/// is reconciled, naming the rule; a linear filter
/// over the same event is evaluated and delivers; the other namespace's event goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_costing_the_square_of_the_event_is_refused_and_stalls_no_other_namespace() {
    let cp = control_plane();
    let client = cp.client().await;
    let a = cp.namespace("tenant-a").await;
    let b = cp.namespace("tenant-b").await;
    let digits: Vec<u64> = (0..120_000).map(|i| i % 10).collect();
    let large = json!({"a": digits, "b": digits});
    for mode in INGEST_MODES {
        // Time enough for the linear filter over the large event in a debug build.
        let op = ModeOperator::start(cp, mode, &[&a, &b], |args| {
            args.filter_timeout = Duration::from_secs(60);
        })
        .await;
        let suffix = format!("{mode:?}").to_lowercase();
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &a);

        let (quadratic, linear) = (format!("quadratic-{suffix}"), format!("linear-{suffix}"));
        let quadratic_rx = counting_webhook(&client, &a, &quadratic, SECRET).await;
        // The API server refuses the plain form at admission...
        let refused = webhooks
            .patch(
                &quadratic,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"filter": "data.a.all(x, !(x in data.b))"}})),
            )
            .await
            .expect_err("the API server refuses a quadratic filter");
        assert!(
            refused
                .to_string()
                .contains("may use only its own variable"),
            "{refused}"
        );
        // ...and the operator every form, such as one the CRD's pattern does not see.
        set_filter(
            &webhooks,
            &quadratic,
            "data.a.all(x, (x >= 0) && !(x in data.b))",
        )
        .await;
        let why = wait_ready_reason(&client, &a, &quadratic, "False", "FilterInvalid").await;
        assert!(
            why.contains("uses data") && why.contains("linear"),
            "the refusal names the rule: {why}"
        );
        let linear_filter = "data.a.all(x, x >= 0) && 5 in data.b";
        let linear_rx = filtered_webhook(&client, &webhooks, &a, &linear, linear_filter).await;
        let other_rx = counting_webhook(&client, &b, &format!("other-{suffix}"), SECRET).await;

        let posted = Instant::now();
        let (large_accepted, other) = large_then_other(&op, (&a, &b), &large, &other_rx).await;
        delivered(&linear_rx, "the large event through the linear filter").await;
        let large_delivered = posted.elapsed();
        // Whatever the refused Webhook would have got is sent by now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let refused_got = quadratic_rx.counts().1;
        println!(
            "FIGURES tenants::quadratic_filter mode={suffix} event_kb={} large_accepted_ms={} other_namespace_delivered_ms={} (from its post) large_delivered_ms={} refused_webhook_requests={refused_got}",
            large.to_string().len() / 1024,
            large_accepted.as_millis(),
            other.as_millis(),
            large_delivered.as_millis(),
        );
        assert_eq!(
            refused_got, 0,
            "{suffix}: the refused filter's Webhook got the event"
        );
        // Generous: the point is seconds, not the minute a quadratic filter took.
        assert!(
            other < Duration::from_secs(10),
            "{suffix}: the other namespace's event took {other:?}"
        );
        op.op.stop().await;
    }
}

/// The notes of the warning Events with `reason` recorded on Webhook `name` of `namespace`.
async fn warnings(client: &kube::Client, namespace: &str, name: &str, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), namespace);
    events
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .filter_map(|e| e.note)
        .collect()
}

/// A Secret bound to none and shared by more Webhooks than its warning names, all there before
/// the operator starts (as after a restart): the `SecretShared` warning goes to the Webhooks it
/// names (at most five, first by name) with how many share it; the others get none, rather than
/// one Event per Webhook at every start (thousands of writes for one fact about the Secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_shared_by_many_webhooks_is_warned_about_on_the_five_it_names() {
    use k8s_openapi::api::core::v1::Secret;
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("shared-many").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "shared", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET},
    }))
    .unwrap();
    secrets.create(&Default::default(), &secret).await.unwrap();
    let names: Vec<String> = (1..=7).map(|i| format!("shared-{i}")).collect();
    for name in &names {
        let w: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
            "spec": {"url": "http://127.0.0.1:9/h", "events": ["*"], "secretRef": {"name": "shared"}},
        }))
        .unwrap();
        webhooks.create(&Default::default(), &w).await.unwrap();
    }
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::Durable, &[&ns], |_| {}).await;
    for name in &names {
        wait_ready(&webhooks, name).await;
    }
    for name in &names[..5] {
        let notes = shared_warnings(&client, &ns, name).await;
        // Counted as the operator finds them: "used by Webhooks shared-1,shared-2" or "used by 7
        // Webhooks (... and 2 more)".
        assert!(
            notes[0].contains("the signing Secret shared is used by")
                && notes[0].contains("bound to none"),
            "{notes:?}"
        );
    }
    // The warnings of the five are written; whatever the other two were sent would be by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in &names[5..] {
        let notes = warnings(&client, &ns, name, "SecretShared").await;
        assert!(notes.is_empty(), "{name} was warned too: {notes:?}");
    }
    op.op.stop().await;
}

/// The `SecretShared` warnings recorded on Webhook `name`, once there is one.
async fn shared_warnings(client: &kube::Client, namespace: &str, name: &str) -> Vec<String> {
    eventually(
        "a SecretShared warning",
        Duration::from_secs(30),
        || async {
            let notes = warnings(client, namespace, name, "SecretShared").await;
            (!notes.is_empty()).then_some(notes)
        },
    )
    .await
}

/// A linear filter over a large event (480 KB) with a filter budget of 20 ms: the filter is
/// evaluated off the request and delivery workers, gives up at its budget, and the event is
/// not delivered to that Webhook, which gets a FilterFailed warning Event; the Webhook without
/// a filter in the same namespace and the other namespace's event are delivered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_its_filter_budget_fails_on_its_webhook_and_delays_no_other_namespace() {
    let cp = control_plane();
    let client = cp.client().await;
    let a = cp.namespace("budget-a").await;
    let b = cp.namespace("budget-b").await;
    let digits: Vec<u64> = (0..120_000).map(|i| i % 10).collect();
    let large = json!({"a": digits, "b": digits});
    for mode in INGEST_MODES {
        let op = ModeOperator::start(cp, mode, &[&a, &b], |args| {
            args.filter_timeout = Duration::from_millis(20);
        })
        .await;
        let suffix = format!("{mode:?}").to_lowercase();
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &a);
        let filtered = format!("filtered-{suffix}");
        let filtered_rx =
            filtered_webhook(&client, &webhooks, &a, &filtered, "data.a.all(x, x >= 0)").await;
        let plain_rx = counting_webhook(&client, &a, &format!("plain-{suffix}"), SECRET).await;
        let other_rx = counting_webhook(&client, &b, &format!("other-{suffix}"), SECRET).await;

        let (large_accepted, other) = large_then_other(&op, (&a, &b), &large, &other_rx).await;
        delivered(&plain_rx, "the large event to the Webhook without a filter").await;
        let notes = eventually(
            "a FilterFailed Event on the filtered Webhook",
            Duration::from_secs(30),
            || async {
                let notes = warnings(&client, &a, &filtered, "FilterFailed").await;
                (!notes.is_empty()).then_some(notes)
            },
        )
        .await;
        let timeouts = crate::support::metric(
            op.op.op.metrics_addr,
            "hookrelay_filter_evaluations_total{result=\"timeout\"}",
        )
        .await
        .unwrap_or(0.0);
        println!(
            "FIGURES tenants::filter_budget mode={suffix} event_kb={} budget_ms=20 large_accepted_ms={} other_namespace_delivered_ms={} (from its post) filtered_webhook_requests={} timeouts={timeouts}",
            large.to_string().len() / 1024,
            large_accepted.as_millis(),
            other.as_millis(),
            filtered_rx.counts().1,
        );
        assert!(
            notes[0].contains("not delivered") && notes[0].contains("within 20 ms"),
            "{suffix}: the Event says what happened: {notes:?}"
        );
        assert!(timeouts >= 1.0, "{suffix}: the timeout is counted");
        assert_eq!(
            filtered_rx.counts().1,
            0,
            "{suffix}: an event over its filter budget is not delivered to that Webhook"
        );
        // Generous: measured well under a second.
        assert!(
            other < Duration::from_secs(2),
            "{suffix}: the other namespace's event took {other:?}"
        );
        op.op.stop().await;
    }
}

/// Team A binds its signing Secret and its `headersFrom` Secret to its own Webhook
/// (`hookrelay.dev/webhooks: team-a`); a Webhook of team B in the same namespace that names
/// them is refused (`SecretNotBound`) and gets nothing, signed or not, while team A's Webhook
/// is delivered to. Two Webhooks sharing a Secret bound to none still work, with a
/// `SecretShared` warning Event on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_cannot_sign_with_or_send_the_headers_of_a_secret_bound_to_another() {
    use k8s_openapi::api::core::v1::Secret;
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("bound-secrets").await;
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::Durable, &[&ns], |_| {}).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let team_a = counting_webhook(&client, &ns, "team-a", SECRET).await;
    let bind = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {"hookrelay.dev/webhooks": "team-a"}}}),
                    ),
                )
                .await
                .unwrap();
        }
    };
    bind("team-a-secret").await;
    let headers: Secret = serde_json::from_value(json!({
        "metadata": {"name": "team-a-headers", "labels": {"hookrelay.dev/webhook-headers": "true"},
                     "annotations": {"hookrelay.dev/webhooks": "team-a"}},
        "stringData": {"Authorization": "Bearer team-a-only"},
    }))
    .unwrap();
    secrets.create(&Default::default(), &headers).await.unwrap();

    let (team_b, b_addr) = CountingReceiver::start().await;
    let apply = |name: &str, spec: serde_json::Value| {
        let webhooks = webhooks.clone();
        let w: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap();
        async move { webhooks.create(&Default::default(), &w).await.unwrap() }
    };
    let url = format!("http://{b_addr}/h");
    apply(
        "team-b-signs",
        json!({"url": url, "events": ["*"], "secretRef": {"name": "team-a-secret"}}),
    )
    .await;
    let signing = wait_ready_reason(&client, &ns, "team-b-signs", "False", "SecretNotBound").await;
    assert!(signing.contains("signing Secret"), "{signing}");
    // Its own signing Secret, but team A's headers.
    let own: Secret = serde_json::from_value(json!({
        "metadata": {"name": "team-b-secret", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET},
    }))
    .unwrap();
    secrets.create(&Default::default(), &own).await.unwrap();
    apply(
        "team-b-headers",
        json!({"url": url, "events": ["*"], "secretRef": {"name": "team-b-secret"},
               "headersFrom": {"secretRef": {"name": "team-a-headers"}}}),
    )
    .await;
    let borrowed =
        wait_ready_reason(&client, &ns, "team-b-headers", "False", "SecretNotBound").await;
    assert!(borrowed.contains("headersFrom Secret"), "{borrowed}");

    // Shared and bound to none: both work, and each is warned about.
    for name in ["shared-1", "shared-2"] {
        apply(
            name,
            json!({"url": url, "events": ["document.error"], "secretRef": {"name": "team-b-secret"}}),
        )
        .await;
        wait_ready(&webhooks, name).await;
    }
    for name in ["shared-1", "shared-2"] {
        let notes = shared_warnings(&client, &ns, name).await;
        assert!(
            notes[0].contains("team-b-secret") && notes[0].contains("hookrelay.dev/webhooks"),
            "{notes:?}"
        );
    }

    op.post_event(&ns, "document.completed", json!({"document_id": 1}))
        .await;
    delivered(&team_a, "team A's event").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        team_b.counts().1,
        0,
        "a Webhook refused its borrowed Secret received a request"
    );
    op.op.stop().await;
}

/// In JetStream mode one namespace's events may take at most its share of the stream
/// (`--nats-max-bytes-per-namespace`, here 64 KiB): past it that namespace's ingest answers 429
/// `namespace_quota` with a `Retry-After`, storing nothing, while another namespace's events are
/// still taken and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_cannot_take_more_than_its_share_of_the_stream() {
    let cp = control_plane();
    let client = cp.client().await;
    let greedy = cp.namespace("share-greedy").await;
    let other = cp.namespace("share-other").await;
    let op = ModeOperator::start(
        cp,
        hookrelay::http::IngestMode::JetStream,
        &[&greedy, &other],
        |args| args.nats_max_bytes_per_namespace = Some(64 << 10),
    )
    .await;
    let greedy_rx = counting_webhook(&client, &greedy, "greedy", SECRET).await;
    let other_rx = counting_webhook(&client, &other, "other", SECRET).await;
    // About 8 KiB each, stored twice (the event and its work item).
    let event =
        json!([{"event": "document.completed", "data": {"blob": "x".repeat(8 << 10)}}]).to_string();
    let mut accepted = 0;
    let refusal = loop {
        let (status, reply) =
            crate::support::post_events(op.op.op.listen_addr, &greedy, None, &event).await;
        if status != 202 {
            break (status, reply);
        }
        accepted += 1;
        assert!(accepted < 20, "the namespace's share never ran out");
    };
    println!(
        "FIGURES tenants::namespace_share share_kib=64 event_kib=8 accepted_before_429={accepted}"
    );
    assert_eq!(refusal.0, 429, "{}", refusal.1);
    assert_eq!(
        refusal.1["error"]["code"], "namespace_quota",
        "{}",
        refusal.1
    );
    let message = refusal.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--nats-max-bytes-per-namespace"),
        "{message}"
    );
    assert!(
        (2..=4).contains(&accepted),
        "{accepted} events of 16 KiB fit 64 KiB"
    );
    // The other namespace is not affected, and what was taken is delivered.
    op.post_event(&other, "document.completed", json!({"document_id": 1}))
        .await;
    delivered(&other_rx, "the other namespace's event").await;
    eventually(
        "the greedy namespace's accepted events",
        Duration::from_secs(60),
        || async { (greedy_rx.counts().0 == accepted).then_some(()) },
    )
    .await;
    op.op.stop().await;
}

/// The test seams (`--test-address-map`, `--test-resolve`: connect or resolve elsewhere than
/// the egress policy judged) exist only with the cargo feature `test-seams`, which the tests
/// build with: the release binary has no such flags, and refuses to start while their
/// environment variables are set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_binary_has_no_test_seams() {
    let cp = control_plane();
    let ns = cp.namespace("no-seams").await;
    let binary = crate::support::process::release_binary();
    // (exited successfully, its output); a binary still running after 20 s took the seam.
    let run = async |args: &[&str], env: &[(&str, &str)]| {
        let child = tokio::process::Command::new(&binary)
            .arg("run")
            .args(["--watch-namespace", &ns, "--metrics-addr", "127.0.0.1:0"])
            .args(["--listen-addr", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", &cp.kubeconfig)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the release binary runs");
        match tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await {
            Ok(out) => {
                let out = out.expect("its output");
                let text = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                (out.status.success(), text)
            }
            Err(_) => (true, "still running after 20 s".into()),
        }
    };
    for flag in ["--test-address-map", "--test-resolve"] {
        let (ok, text) = run(&[flag, "0.0.0.0/0=127.0.0.1"], &[]).await;
        assert!(!ok, "{flag} was accepted: {text}");
        assert!(
            text.contains(&format!("unexpected argument '{flag}'")),
            "{flag}: {text}"
        );
    }
    for variable in hookrelay::operator::TEST_SEAM_VARIABLES {
        let (ok, text) = run(&[], &[(variable, "0.0.0.0/0=127.0.0.1")]).await;
        assert!(!ok, "{variable} was ignored: {text}");
        assert!(
            text.contains(&format!("{variable} is set, but it is a test seam")),
            "{variable}: {text}"
        );
    }
}

/// A `--nats-url` with credentials (`nats://user:password@host`) that cannot be reached: the
/// error that stops the operator names the server without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_password_in_the_url_stays_out_of_the_connect_error() {
    let cp = control_plane();
    let ns = cp.namespace("nats-password").await;
    let port = crate::support::free_port();
    let mut args =
        crate::support::ingest_args(&[&ns], hookrelay::http::IngestMode::JetStream, None);
    args.nats_url = Some(format!(
        "nats://hookrelay:s3cret-nats-password@127.0.0.1:{port}"
    ));
    let error = crate::support::InProcess::start_error(cp.config().await, args).await;
    assert!(
        error.contains("cannot connect to NATS") && error.contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
    assert!(
        !error.contains("s3cret"),
        "the password is in the error: {error}"
    );
}

/// With every namespace served (no `--watch-namespace`), one valid token asking about 1,000
/// namespaces that do not exist, 50 at a time, while another caller lists its Webhooks: once
/// the operator has listed the namespaces, each is refused (403, as a review's no would be)
/// before any SubjectAccessReview, and the other caller is served throughout. (Namespaces that
/// exist cost a review each, within the per-caller budget.) On a control plane of its own, as
/// the operator watches every namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_spraying_namespaces_costs_another_caller_nothing() {
    let _serial = crate::support::OWN_CONTROL_PLANES.lock().await;
    let cp = crate::support::OwnControlPlane::start("review-spray").await;
    let (sprayer_ns, tenant_ns) = (cp.namespace("sprayer").await, cp.namespace("tenant").await);
    let sprayer = cp.hookrelay_token(&sprayer_ns, "sprayer").await;
    let tenant = cp.hookrelay_token(&tenant_ns, "tenant").await;
    let mut args = crate::support::local_args(&[]);
    args.ingest_mode = hookrelay::http::IngestMode::Direct;
    let op = crate::support::InProcess::start_with(cp.config().await, args).await;
    let api = op.op.listen_addr;
    let list = format!("/api/webhooks?namespace={tenant_ns}");
    eventually("the namespaces listed", Duration::from_secs(30), || async {
        op.op.auth.knows_namespaces().then_some(())
    })
    .await;
    let reviews_before = op.op.auth.access_reviews();

    // One client each (building a client per request costs the test's runtime, which the
    // in-process operator shares, more than the requests themselves).
    let get = |http: reqwest::Client, path: String, token: String| async move {
        let response = http
            .get(format!("http://{api}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the API answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    };
    let (sprayer_http, tenant_http) = (reqwest::Client::new(), reqwest::Client::new());
    let started = Instant::now();
    let spray = futures::stream::iter(0..1000)
        .map(|i| {
            let path = format!("/api/webhooks?namespace=sprayed-{i}");
            let call = get(sprayer_http.clone(), path, sprayer.clone());
            async move { call.await.0 }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>();
    let tenant_calls = futures::stream::iter(0..20)
        .then(|_| {
            let call = get(tenant_http.clone(), list.clone(), tenant.clone());
            async move {
                let sent = Instant::now();
                let (status, body) = call.await;
                (status, body, sent.elapsed())
            }
        })
        .collect::<Vec<_>>();
    let (spray, tenant_calls) = tokio::join!(spray, tenant_calls);
    let took = started.elapsed();
    let reviews = op.op.auth.access_reviews() - reviews_before;
    let count = |code: u16| spray.iter().filter(|s| **s == code).count();
    let slowest = tenant_calls
        .iter()
        .map(|(_, _, t)| *t)
        .max()
        .unwrap_or_default();
    let latencies: Vec<u128> = tenant_calls.iter().map(|(_, _, t)| t.as_millis()).collect();
    println!("tenant latencies ms: {latencies:?}");
    println!(
        "FIGURES tenants::review_spray sprayed=1000 forbidden={} too_many={} unavailable={} access_reviews={reviews} tenant_ok={} tenant_slowest_ms={} took_ms={}",
        count(403),
        count(429),
        count(503),
        tenant_calls.iter().filter(|(s, _, _)| *s == 200).count(),
        slowest.as_millis(),
        took.as_millis(),
    );
    for (status, body, _) in &tenant_calls {
        assert_eq!(*status, 200, "the other caller during the spray: {body}");
    }
    assert_eq!(count(403), 1000, "every sprayed namespace is refused");
    // The other caller's own few: none for a namespace that does not exist.
    assert!(reviews <= 5, "{reviews} reviews, at most 5 expected");
    op.stop().await;
}

/// Messages per subject in the stream `stream`, read as the NATS user of `url`.
async fn stream_subjects(url: &str, stream: &str) -> std::collections::BTreeMap<String, usize> {
    use futures::TryStreamExt;
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.unwrap();
    stream
        .info_with_subjects(">")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The filter subjects of the stream's durable consumers, by consumer.
async fn consumer_filters(url: &str, stream: &str) -> Vec<(String, String)> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.unwrap();
    let mut filters = Vec::new();
    for name in ["router", "deliverer", "serial", "recorder"] {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.unwrap();
        let info = consumer.info().await.unwrap();
        filters.push((name.to_owned(), info.config.filter_subject.clone()));
    }
    filters
}

/// An in-process operator in JetStream mode watching `ns`, on the stream `stream` of the NATS
/// server at `url`.
async fn installation(
    cp: &crate::support::ControlPlane,
    ns: &str,
    url: String,
    stream: &str,
) -> crate::support::InProcess {
    let mut args = crate::support::ingest_args(&[ns], hookrelay::http::IngestMode::JetStream, None);
    args.nats_url = Some(url);
    args.nats_stream = stream.to_owned();
    crate::support::InProcess::start_with(cp.config().await, args).await
}

/// Posts `n` events with document ids from `first` to namespace `ns`; all must be accepted.
async fn post_numbered(op: &crate::support::InProcess, ns: &str, first: usize, n: usize) {
    let events: Vec<serde_json::Value> = (first..first + n)
        .map(|i| json!({"event": "document.completed", "data": {"document_id": i}}))
        .collect();
    let body = serde_json::Value::Array(events).to_string();
    let (status, reply) = crate::support::post_events(op.op.listen_addr, ns, None, &body).await;
    assert_eq!(status, 202, "{reply}");
}

/// Two installations of hookrelay on one NATS account, each with its own `--nats-stream` (the
/// default `HOOKRELAY`, and `HOOKRELAY_STAGING`), each watching its own namespace with a
/// Webhook of the same name: each delivers exactly its own events, and each stream holds only
/// the subjects under its own lowercased name. Before the subjects followed the stream's name,
/// both streams wanted `hookrelay.>` and the second installation could not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_on_one_nats_account_deliver_each_their_own_events() {
    let cp = control_plane();
    let client = cp.client().await;
    let nats = crate::support::NatsServer::start().await;
    let (ns_a, ns_b) = (
        cp.namespace("install-a").await,
        cp.namespace("install-b").await,
    );
    let a = installation(cp, &ns_a, nats.url.clone(), "HOOKRELAY").await;
    let b = installation(cp, &ns_b, nats.url.clone(), "HOOKRELAY_STAGING").await;
    let rx_a = counting_webhook(&client, &ns_a, "w", SECRET).await;
    let rx_b = counting_webhook(&client, &ns_b, "w", SECRET).await;

    let started = Instant::now();
    post_numbered(&a, &ns_a, 0, 20).await;
    post_numbered(&b, &ns_b, 100, 15).await;
    for (rx, n, which) in [(&rx_a, 20, "a"), (&rx_b, 15, "b")] {
        eventually(
            &format!("installation {which}'s {n} events delivered"),
            Duration::from_secs(60),
            || async { (rx.counts().0 >= n).then_some(()) },
        )
        .await;
    }
    let delivered = started.elapsed();
    // Whatever would cross over would have come by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (counts_a, counts_b) = (rx_a.counts(), rx_b.counts());

    let subjects_a = stream_subjects(&nats.url, "HOOKRELAY").await;
    let subjects_b = stream_subjects(&nats.url, "HOOKRELAY_STAGING").await;
    let filters_a = consumer_filters(&nats.url, "HOOKRELAY").await;
    let filters_b = consumer_filters(&nats.url, "HOOKRELAY_STAGING").await;
    println!(
        "FIGURES tenants::two_installations events_a=20 events_b=15 delivered_a={counts_a:?} delivered_b={counts_b:?} (distinct, requests) both_delivered_ms={} subjects_a={} subjects_b={}",
        delivered.as_millis(),
        subjects_a.len(),
        subjects_b.len(),
    );
    assert_eq!(counts_a, (20, 20), "installation a got exactly its events");
    assert_eq!(counts_b, (15, 15), "installation b got exactly its events");
    // Each stream holds only its own subjects; the default keeps `hookrelay.`.
    assert!(
        subjects_a.keys().all(|s| s.starts_with("hookrelay.")),
        "{subjects_a:?}"
    );
    assert!(
        subjects_b
            .keys()
            .all(|s| s.starts_with("hookrelay_staging.")),
        "{subjects_b:?}"
    );
    // Routed as they were taken in: stored as their work items, on each stream's own subjects.
    assert_eq!(
        subjects_a.get(&format!("hookrelay.deliveries.{ns_a}.w")),
        Some(&20),
        "{subjects_a:?}"
    );
    assert_eq!(
        subjects_b.get(&format!("hookrelay_staging.deliveries.{ns_b}.w")),
        Some(&15),
        "{subjects_b:?}"
    );
    for (name, filter) in &filters_a {
        assert!(filter.starts_with("hookrelay."), "{name}: {filter}");
    }
    for (name, filter) in &filters_b {
        assert!(filter.starts_with("hookrelay_staging."), "{name}: {filter}");
    }
    a.stop().await;
    b.stop().await;
}

/// Set, the least-privilege test finds out what the permissions must be: its users get no
/// permissions (everything allowed), nats-server traces every message, and the test prints
/// each subject the installations published or subscribed to (then stops, as nothing is
/// denied).
const TRACE_NATS_SUBJECTS: &str = "HOOKRELAY_TRACE_NATS_SUBJECTS";

/// A nats-server configuration with one user per installation, each allowed exactly what
/// hookrelay says its stream needs (`Subjects::permissions`, the README's snippet); a user
/// without a stream may do anything (whoever runs NATS).
fn least_privilege_config(users: &[(&str, &str, Option<&str>)]) -> String {
    let tracing = std::env::var_os(TRACE_NATS_SUBJECTS).is_some();
    let users: Vec<String> = users
        .iter()
        .map(|(user, password, stream)| {
            let permissions = stream
                .filter(|_| !tracing)
                .map(|stream| {
                    hookrelay::delivery::jetstream::Subjects::for_stream(stream)
                        .unwrap()
                        .permissions()
                        .to_config(6)
                })
                .unwrap_or_default();
            format!("    {{\n      user: {user}\n      password: {password}\n      {permissions}\n    }}")
        })
        .collect();
    let trace = if tracing { "trace: true\n" } else { "" };
    format!(
        "{trace}authorization {{\n  users: [\n{}\n  ]\n}}\n",
        users.join("\n")
    )
}

/// The permission violations nats-server logged, one line each.
fn violations(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// Two installations on one NATS account, each connecting as a user allowed exactly the
/// permissions the README lists for its stream (`alice`: `HOOKRELAY`; `bob`:
/// `HOOKRELAY_STAGING`, a stream whoever runs NATS created beforehand without message
/// schedules, which bob's installation adds), credentials in `--nats-url`. Installation a
/// ingests (a keyed repeat included), routes, delivers on both lanes (rate-limited and ordered
/// Webhooks are the leader's serial lane), retries through parked copies, records attempts,
/// recovers and searches; b delivers its own events. nats-server logs no permission violation
/// for either. Then bob, connected as himself, tries to read a's stream every way a client
/// could (its subjects, every inbox, its stream's and consumers' API): each is refused and
/// logged as a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_nats_user_runs_an_installation_and_reads_no_other() {
    let cp = control_plane();
    let client = cp.client().await;
    let config = least_privilege_config(&[
        ("alice", "alice-nats-password", Some("HOOKRELAY")),
        ("bob", "bob-nats-password", Some("HOOKRELAY_STAGING")),
        ("admin", "admin-nats-password", None),
    ]);
    let nats = crate::support::NatsServer::start_with_config(&config).await;
    // The NATS client takes no credentials from a URL: given apart.
    let admin = async_nats::ConnectOptions::with_user_and_password(
        "admin".into(),
        "admin-nats-password".into(),
    )
    .connect(nats.url.as_str())
    .await
    .unwrap();
    let admin = async_nats::jetstream::new(admin);
    admin
        .create_stream(async_nats::jetstream::stream::Config {
            name: "HOOKRELAY_STAGING".into(),
            subjects: vec!["hookrelay_staging.>".into()],
            max_messages: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let (ns_a, ns_b) = (cp.namespace("acl-a").await, cp.namespace("acl-b").await);
    let a = installation(
        cp,
        &ns_a,
        nats.url_as("alice", "alice-nats-password"),
        "HOOKRELAY",
    )
    .await;
    let b = installation(
        cp,
        &ns_b,
        nats.url_as("bob", "bob-nats-password"),
        "HOOKRELAY_STAGING",
    )
    .await;
    let ok = counting_webhook(&client, &ns_a, "ok", SECRET).await;
    let (limited, addr) = CountingReceiver::start().await;
    crate::support::create_webhook(
        &client,
        &ns_a,
        "limited",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"rateLimit": {"perSecond": 50, "burst": 5}}),
    )
    .await;
    let (failing, addr) = CountingReceiver::start_answering(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        Duration::ZERO,
    )
    .await;
    crate::support::create_webhook(
        &client,
        &ns_a,
        "failing",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}),
    )
    .await;
    // Ordered: its deliveries wait for the router's progress (the consumers' info).
    let ordered = counting_webhook(&client, &ns_a, "ordered", SECRET).await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns_a);
    webhooks
        .patch(
            "ordered",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ordering": {"key": "data.document_id"}}})),
        )
        .await
        .unwrap();
    eventually(
        "the ordering reconciled",
        Duration::from_secs(60),
        || async {
            let w = webhooks.get("ordered").await.ok()?;
            let status = w.status?;
            (status.observed_generation == w.metadata.generation).then_some(())
        },
    )
    .await;
    wait_ready(&webhooks, "ordered").await;
    let other = counting_webhook(&client, &ns_b, "w", SECRET).await;
    let before = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap();

    post_numbered(&a, &ns_a, 0, 5).await;
    // A keyed event, then its repeat: the duplicate's content is read back from the stream.
    let keyed = r#"{"event":"document.completed","data":{"document_id":5}}"#;
    for _ in 0..2 {
        let (status, reply) =
            crate::support::post_events(a.op.listen_addr, &ns_a, Some("order-5"), keyed).await;
        assert_eq!(status, 202, "{reply}");
    }
    post_numbered(&b, &ns_b, 100, 5).await;
    let failed = || async {
        let stats = webhooks.get("failing").await.ok()?.status?.delivery_stats;
        Some(stats.failed)
    };
    eventually(
        "a's deliveries made, the failing ones failed after 2 attempts each",
        Duration::from_secs(90),
        || async {
            let made = [&ok, &limited, &ordered]
                .iter()
                .all(|rx| rx.counts().0 == 6);
            (made && failed().await? == 6).then_some(())
        },
    )
    .await;
    assert_eq!(failing.counts(), (6, 12), "two attempts each");
    delivered(&other, "b's events").await;
    eventually("b's 5 events", Duration::from_secs(60), || async {
        (other.counts().0 == 5).then_some(())
    })
    .await;

    // Recover (from the stream: republished work items) and search (ordered consumers).
    let api = a.op.listen_addr;
    let (status, body) = crate::support::api_call(
        api,
        "POST",
        &format!("/api/webhooks/failing/recover?since={before}&namespace={ns_a}"),
        None,
        None,
    )
    .await;
    assert_eq!((status, &body["queued"]), (200, &json!(6)), "{body}");
    eventually(
        "the recovered deliveries attempted again",
        Duration::from_secs(60),
        || async { (failing.counts().1 >= 24).then_some(()) },
    )
    .await;
    let (status, body) = crate::support::api_call(
        api,
        "GET",
        &format!("/api/webhooks/ok/deliveries?document_id=3&namespace={ns_a}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["deliveries"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    a.stop().await;
    b.stop().await;
    let staging = admin.get_stream("HOOKRELAY_STAGING").await.unwrap();
    assert!(
        staging.cached_info().config.allow_message_schedules,
        "bob's installation updated the stream it was given"
    );
    let log = nats.log_text();
    if std::env::var_os(TRACE_NATS_SUBJECTS).is_some() {
        // Each distinct subject a client published to or subscribed to, with its user.
        let mut seen = std::collections::BTreeSet::new();
        // Clients' own messages (the Rust client's), not the server's internal ones.
        for line in log.lines().filter(|l| l.contains(":rust:")) {
            for verb in ["<<- [PUB ", "<<- [HPUB ", "<<- [SUB "] {
                if let Some(rest) = line.split(verb).nth(1) {
                    let subject = rest.split([' ', ']']).next().unwrap_or_default();
                    seen.insert(format!("{}{subject}", verb.trim_start_matches("<<- [")));
                }
            }
        }
        for s in seen {
            println!("TRACE {s}");
        }
        return;
    }
    let seen = violations(&log);
    println!(
        "FIGURES tenants::least_privilege installations=2 violations_while_running={}",
        seen.len()
    );
    assert!(seen.is_empty(), "permission violations: {seen:#?}");

    // Bob, the other installation's user, reading a's stream, with the inboxes his permissions
    // allow (so that what is refused is a's stream, not the answers): his own stream answers.
    let bob = async_nats::ConnectOptions::with_user_and_password(
        "bob".into(),
        "bob-nats-password".into(),
    )
    .name("bob-probe")
    .custom_inbox_prefix("_INBOX.hookrelay_staging")
    .connect(nats.url.as_str())
    .await
    .expect("bob connects");
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(bob.clone());
    js.get_stream("HOOKRELAY_STAGING")
        .await
        .expect("bob reads his own stream");
    let mut probes = Vec::new();
    for subject in ["hookrelay.>", "_INBOX.>", "_INBOX.hookrelay.>"] {
        let mut sub = bob.subscribe(subject).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
        probes.push((format!("subscribe {subject}"), got.ok().flatten().is_some()));
    }
    probes.push((
        "stream info HOOKRELAY".into(),
        js.get_stream("HOOKRELAY").await.is_ok(),
    ));
    probes.push((
        "publish to hookrelay.events".into(),
        match js
            .publish(format!("hookrelay.events.{ns_a}"), "{}".into())
            .await
        {
            Ok(stored) => stored.await.is_ok(),
            Err(_) => false,
        },
    ));
    let created = js
        .create_consumer_on_stream(
            async_nats::jetstream::consumer::pull::Config::default(),
            "HOOKRELAY",
        )
        .await;
    probes.push(("create a consumer on HOOKRELAY".into(), created.is_ok()));
    let fetched = tokio::time::timeout(
        Duration::from_secs(2),
        bob.request("$JS.API.CONSUMER.MSG.NEXT.HOOKRELAY.deliverer", "1".into()),
    )
    .await;
    probes.push((
        "pull from a's deliverer".into(),
        matches!(fetched, Ok(Ok(_))),
    ));
    // The server logs violations as they happen.
    let refused = eventually(
        "bob's probes logged as violations",
        Duration::from_secs(10),
        || async {
            let v = violations(&nats.log_text());
            (v.len() >= probes.len()).then_some(v)
        },
    )
    .await;
    println!(
        "FIGURES tenants::least_privilege probes={} succeeded={} violations_logged={}",
        probes.len(),
        probes.iter().filter(|(_, ok)| *ok).count(),
        refused.len()
    );
    for line in &refused {
        println!("  {line}");
    }
    for (probe, succeeded) in &probes {
        assert!(!succeeded, "bob could {probe}");
    }
    assert!(
        refused.iter().all(|l| l.contains("/user:bob\"")),
        "only bob was refused: {refused:#?}"
    );
}

/// Peak resident memory of a process so far, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Searches read pages of 500 whole DocumentEvents: one tenant's burst of searches over a
/// namespace of large events would hold as many pages at once, in the replica every tenant
/// shares. The operator binary, 1,000 DocumentEvents of 16 KB, then 16 searches at once that
/// each read them all: at most 4 run at once, the others wait up to 2 s for a turn and are
/// answered 503 `history_busy` with Retry-After after it; the operator's peak memory is
/// measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_at_once_are_bounded_and_so_is_the_memory_they_take() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("history-reads").await;
    let op = crate::support::OperatorArgs::new(&ns).start(cp);
    op.wait_ready().await;
    let pid = op.child.id().expect("the operator runs");
    let _receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    let blob = "x".repeat(16 * 1024);
    futures::stream::iter(0..1000)
        .map(|i| {
            let (client, ns, blob) = (client.clone(), ns.clone(), blob.clone());
            async move {
                crate::support::create_event(
                    &client,
                    &ns,
                    &format!("large-{i}"),
                    "document.completed",
                    json!({"document_id": i, "blob": blob}),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    // Taken in by the operator (its DocumentEvent cache, their deliveries) before measuring.
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), &ns);
    eventually(
        "the 1,000 events delivered",
        Duration::from_secs(180),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            let done = list.items.iter().filter(|e| {
                e.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| format!("{p:?}") == "Delivered")
            });
            (done.count() == 1000).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, peak_before) = (crate::support::rss_mib(pid), peak_rss_mib(pid));

    let url = format!(
        "http://{}/api/webhooks/w/deliveries?document_id=nowhere&namespace={ns}",
        op.listen_addr
    );
    // The operator's resident memory, sampled while the searches run.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = sampling.clone();
        async move {
            let mut most = 0f64;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(crate::support::rss_mib(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        }
    });
    let http = reqwest::Client::new();
    let started = Instant::now();
    let answers = futures::future::join_all((0..16).map(|_| {
        let call = http.get(&url).send();
        async move {
            let answer = call.await.unwrap();
            let status = answer.status().as_u16();
            let retry_after = answer
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value =
                serde_json::from_str(&answer.text().await.unwrap()).unwrap();
            (status, retry_after, body, started.elapsed())
        }
    }))
    .await;
    let took = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let rss_during = sampler.await.unwrap();
    let peak_after = peak_rss_mib(pid);
    let answered: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    let slowest_answered = answered.iter().map(|a| a.3).max().unwrap_or_default();
    println!(
        "FIGURES tenants::history_reads events=1000 event_kb=16 searches=16 answered={} busy={} other={} slowest_answered_ms={} took_ms={} rss_before_mib={rss_before:.0} rss_most_during_mib={rss_during:.0} growth_mib={:.0} vmhwm_before_mib={peak_before:.0} vmhwm_after_mib={peak_after:.0}",
        answered.len(),
        busy.len(),
        16 - answered.len() - busy.len(),
        slowest_answered.as_millis(),
        took.as_millis(),
        rss_during - rss_before,
    );
    for (status, retry_after, body, _) in &answers {
        match status {
            200 => assert_eq!(body["deliveries"], json!([]), "{body}"),
            503 => {
                assert_eq!(body["error"]["code"], "history_busy", "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"));
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("4 searches and recovers"), "{message}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(answered.len() >= 4, "the first four are read at once");
    // Four pages of 500 such events at a time took 69-75 MiB here; all 16 at once, before the
    // bound, 170-176 MiB.
    assert!(
        rss_during - rss_before < 120.0,
        "the searches took {:.0} MiB",
        rss_during - rss_before
    );
}
