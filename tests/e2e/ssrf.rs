//! SSRF, end to end: every spelling of a blocked address is refused, each with
//! its reason in the Webhook's status, and a loopback receiver (the canary) sees no request.
//!
//! The operator runs as in production for loopback (no `--egress-allow-cidr 127.0.0.0/8`), with
//! `--egress-allow-http`, and with the test seams pointing every address it might wrongly allow at the
//! canary: `--test-address-map 0.0.0.0/0=127.0.0.1,::/0=::1` (every URL carries the canary's
//! port), so a private, link-local or metadata address the guard let through would land on the
//! canary instead of leaving the machine. Names are answered by `--test-resolve`. Addresses
//! outside loopback are also judged by the decision function alone, without any operator.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hookrelay::{
    crd::{DocumentEvent, TargetState, Webhook},
    delivery::{EgressDenied, EgressPolicy},
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::support::{
    INGEST_MODES, ModeOperator, OperatorArgs, control_plane, create_event, eventually,
    wait_ready_reason,
};

const WAIT: Duration = Duration::from_secs(120);

/// Where a form is refused.
#[derive(Clone, Copy, PartialEq)]
enum Refused {
    /// When the Webhook is reconciled: `Ready=False/EgressNotAllowed`, the range in the message.
    Reconcile(&'static str),
    /// When the attempt connects (a name's resolved addresses): the attempt's error.
    Connect(&'static str),
    /// The endpoint (allowed) answers 302 towards the canary: the attempt ends with the 302.
    Redirect,
}

struct Form {
    form: String,
    url: String,
    refused: Refused,
}

/// Every request the canary (or a control receiver) got: (method, Host, path).
type Requests = Arc<Mutex<Vec<(String, String, String)>>>;

/// A receiver on one port of both 127.0.0.1 and ::1 that records every request.
async fn canary() -> (u16, Requests) {
    let requests: Requests = Default::default();
    let app = {
        let requests = requests.clone();
        axum::Router::new().fallback(
            move |method: axum::http::Method,
                  headers: axum::http::HeaderMap,
                  uri: axum::http::Uri| {
                let requests = requests.clone();
                async move {
                    let host = headers
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    requests
                        .lock()
                        .unwrap()
                        .push((method.to_string(), host, uri.to_string()));
                    "ok"
                }
            },
        )
    };
    // The same port on both loopback addresses (IPv6 literals are mapped onto ::1).
    for _ in 0..50 {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            for listener in [v4, v6] {
                let app = app.clone();
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
            return (port, requests);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// An endpoint on an allowed address that redirects every request to `location`.
async fn redirector(location: String) -> (SocketAddr, Requests) {
    let requests: Requests = Default::default();
    let app = {
        let requests = requests.clone();
        axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let (requests, location) = (requests.clone(), location.clone());
            async move {
                requests
                    .lock()
                    .unwrap()
                    .push(("POST".into(), String::new(), uri.to_string()));
                (
                    axum::http::StatusCode::FOUND,
                    [(axum::http::header::LOCATION, location)],
                    "moved",
                )
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, requests)
}

/// A name of /etc/hosts (not a `localhost` one, which the guard knows without resolving) that
/// the system resolver answers with a loopback address: `vm` or the machine's name here.
fn system_name_resolving_to_loopback() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut fields = line.split('#').next()?.split_whitespace();
        let ip: IpAddr = fields.next()?.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        fields
            .find(|name| {
                !name.to_ascii_lowercase().contains("localhost")
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            })
            .map(str::to_owned)
    })
}

/// The controls' address: allowed by `--egress-allow-cidr`, nothing listens there, and the address map
/// sends it (like every address) to 127.0.0.1, where the control receiver listens. So a control
/// is delivered only through the seams these tests rely on, and never leaves loopback.
const CONTROL_IP: &str = "127.0.0.4";

/// The names the operator's test resolver answers: (name, address).
const TEST_NAMES: &[(&str, &str)] = &[
    ("loopback.test", "127.0.0.1"),
    ("loopback6.test", "::1"),
    ("mapped.test", "::ffff:127.0.0.1"),
    ("rebind.test", "10.0.0.1"),
    ("metadata.test", "169.254.169.254"),
    ("ula.test", "fd00::1"),
    // The control: an address the guard allows (CONTROL_IP), which the address map sends to
    // the control receiver.
    ("control.test", CONTROL_IP),
];

fn forms(canary: u16, redirect: SocketAddr, system_name: Option<&str>) -> Vec<Form> {
    let reconcile = |form: &str, host: &str, range| Form {
        form: form.to_owned(),
        url: format!("http://{host}:{canary}/hook"),
        refused: Refused::Reconcile(range),
    };
    let connect = |form: &str, host: &str, range| Form {
        form: form.to_owned(),
        url: format!("http://{host}:{canary}/hook"),
        refused: Refused::Connect(range),
    };
    let mut forms = vec![
        reconcile("IPv4 loopback", "127.0.0.1", "loopback"),
        reconcile("decimal", "2130706433", "loopback"),
        reconcile("octal", "0177.0.0.1", "loopback"),
        reconcile("hex octet", "0x7f.0.0.1", "loopback"),
        reconcile("hex integer", "0x7f000001", "loopback"),
        reconcile("short (127.1)", "127.1", "loopback"),
        reconcile("dotted, trailing dot", "127.0.0.1.", "loopback"),
        reconcile("other loopback address", "127.0.0.3", "loopback"),
        reconcile("unspecified (0.0.0.0)", "0.0.0.0", "\"this network\""),
        reconcile("unspecified, short (0)", "0", "\"this network\""),
        reconcile("IPv6 loopback", "[::1]", "loopback"),
        reconcile("IPv6 unspecified", "[::]", "unspecified"),
        reconcile("IPv4-mapped", "[::ffff:127.0.0.1]", "loopback"),
        reconcile("IPv4-mapped, hex", "[::ffff:7f00:1]", "loopback"),
        reconcile(
            "IPv4-mapped, long",
            "[0:0:0:0:0:ffff:127.0.0.1]",
            "loopback",
        ),
        reconcile("IPv4-compatible", "[::127.0.0.1]", "IPv4-compatible"),
        reconcile("NAT64", "[64:ff9b::7f00:1]", "loopback"),
        reconcile("localhost", "localhost", "loopback"),
        reconcile("LOCALHOST", "LOCALHOST", "loopback"),
        reconcile("localhost, trailing dot", "localhost.", "loopback"),
        reconcile("under localhost", "foo.localhost", "loopback"),
        reconcile(
            "under localhost, trailing dot",
            "foo.localhost.",
            "loopback",
        ),
        // Outside loopback: the address map would send each to the canary if it were allowed.
        reconcile("private 10/8", "10.0.0.1", "private"),
        reconcile("private 172.16/12", "172.16.0.1", "private"),
        reconcile("private 192.168/16", "192.168.0.1", "private"),
        reconcile(
            "cloud metadata",
            "169.254.169.254",
            "link-local (cloud metadata)",
        ),
        reconcile(
            "cloud metadata, decimal",
            "2852039166",
            "link-local (cloud metadata)",
        ),
        reconcile(
            "cloud metadata, IPv4-mapped",
            "[::ffff:169.254.169.254]",
            "link-local (cloud metadata)",
        ),
        reconcile(
            "cloud metadata, NAT64",
            "[64:ff9b::a9fe:a9fe]",
            "link-local (cloud metadata)",
        ),
        reconcile(
            "carrier-grade NAT",
            "100.64.0.1",
            "shared (carrier-grade NAT)",
        ),
        reconcile("IPv6 unique local", "[fc00::1]", "unique local (private)"),
        reconcile("IPv6 link-local", "[fe80::1]", "link-local"),
        connect(
            "name -> 127.0.0.1 (test resolver)",
            "loopback.test",
            "loopback",
        ),
        connect("name, trailing dot", "loopback.test.", "loopback"),
        connect("name, upper case", "LOOPBACK.TEST", "loopback"),
        connect("name -> ::1", "loopback6.test", "loopback"),
        connect("name -> ::ffff:127.0.0.1", "mapped.test", "loopback"),
        connect("name -> 10.0.0.1 at connect time", "rebind.test", "private"),
        connect(
            "name -> 169.254.169.254 at connect time",
            "metadata.test",
            "link-local (cloud metadata)",
        ),
        connect(
            "name -> fd00::1 at connect time",
            "ula.test",
            "unique local (private)",
        ),
    ];
    if let Some(name) = system_name {
        forms.push(connect(
            "name -> loopback (system resolver, /etc/hosts)",
            name,
            "loopback",
        ));
    }
    forms.push(Form {
        form: "302 from an allowed address to the canary".into(),
        url: format!("http://{redirect}/hook"),
        refused: Refused::Redirect,
    });
    forms
}

async fn create_webhook(client: &Client, ns: &str, name: &str, url: &str) {
    let webhook: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": {"url": url, "events": ["*"], "secretRef": {"name": "signing"},
                 "delivery": {"maxAttempts": 1}}
    }))
    .unwrap();
    Api::<Webhook>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
}

/// The first attempt recorded in the Webhook's history.
async fn first_attempt(
    webhooks: &Api<Webhook>,
    name: &str,
) -> Option<hookrelay::crd::DeliveryRecord> {
    let w = webhooks.get(name).await.ok()?;
    w.status?.recent_deliveries.into_iter().last()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_form_of_a_blocked_address_is_refused_and_the_canary_sees_nothing() {
    let cp = control_plane();
    let ns = cp.namespace("ssrf").await;
    let client = cp.client().await;
    let (canary_port, canary_requests) = canary().await;
    let (redirect, redirect_requests) =
        redirector(format!("http://127.0.0.1:{canary_port}/redirected")).await;
    // Controls: allowed addresses that the address map sends to loopback, on their own port.
    let (control_port, control_requests) = canary().await;

    let names = TEST_NAMES
        .iter()
        .map(|(name, ip)| format!("{name}={ip}"))
        .collect::<Vec<_>>()
        .join(",");
    let redirect_ip = redirect.ip().to_string();
    let op = OperatorArgs::new(&ns)
        .with_auth()
        // Only the redirecting endpoint and the control; loopback stays blocked, as in
        // production.
        .allow_cidrs(&[&format!("{redirect_ip}/32"), &format!("{CONTROL_IP}/32")])
        // First match wins: the redirector stays where it is, everything else goes to
        // loopback, where the canary listens on the port of every URL.
        .arg(
            "--test-address-map",
            &format!("{redirect_ip}={redirect_ip},0.0.0.0/0=127.0.0.1,::/0=::1"),
        )
        .arg("--test-resolve", &names)
        .start(cp);
    op.wait_ready().await;
    let log = op.log_text();
    assert!(
        log.contains("TEST SEAM --test-resolve IS SET")
            && log.contains("TEST SEAM --test-address-map IS SET"),
        "both seams are warned about at start: {}",
        op.log.display()
    );

    create_signing_secret(&client, &ns).await;

    let system_name = system_name_resolving_to_loopback();
    let forms = forms(canary_port, redirect, system_name.as_deref());
    assert!(forms.len() >= 20, "{} forms", forms.len());
    for (i, form) in forms.iter().enumerate() {
        create_webhook(&client, &ns, &format!("form-{i:02}"), &form.url).await;
    }
    let controls = [
        (
            "control-literal",
            format!("http://{CONTROL_IP}:{control_port}/hook"),
        ),
        (
            "control-name",
            format!("http://control.test:{control_port}/hook"),
        ),
    ];
    for (name, url) in &controls {
        create_webhook(&client, &ns, name, url).await;
    }
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    // Every Webhook has its verdict before the event is sent, so each is routed as it will be.
    let mut reasons = Vec::new();
    for (i, form) in forms.iter().enumerate() {
        let name = format!("form-{i:02}");
        let reason = match form.refused {
            Refused::Reconcile(_) => {
                wait_ready_reason(&client, &ns, &name, "False", "EgressNotAllowed").await
            }
            _ => wait_ready_reason(&client, &ns, &name, "True", "Routed").await,
        };
        reasons.push(reason);
    }
    for (name, _) in &controls {
        wait_ready_reason(&client, &ns, name, "True", "Routed").await;
    }

    create_event(
        &client,
        &ns,
        "doc-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;

    // Every target of the event is settled: refused ones held with the guard's reason, the
    // others attempted once.
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let targets = eventually("every target of doc-1 held or attempted", WAIT, || async {
        let e = events.get("doc-1").await.ok()?;
        let targets = e.status?.deliveries;
        let settled = targets.len() == forms.len() + controls.len()
            && targets
                .iter()
                .all(|t| (t.state == TargetState::Held && t.error.is_some()) || t.attempts >= 1);
        settled.then_some(targets)
    })
    .await;
    // The controls prove the seams work in this operator: an address the guard allows (a
    // literal, a name) is connected to where the address map says (127.0.0.1), not where the
    // URL says (nothing listens on CONTROL_IP).
    eventually("both controls delivered to loopback", WAIT, || async {
        (control_requests.lock().unwrap().len() >= 2).then_some(())
    })
    .await;

    // Every attempt has ended (each target is held or attempted): none reached the canary, on
    // either address. Its Host header names the form that got through.
    let seen = canary_requests.lock().unwrap().clone();
    assert!(seen.is_empty(), "the canary got requests: {seen:?}");

    let mut table = Vec::new();
    for (i, form) in forms.iter().enumerate() {
        let name = format!("form-{i:02}");
        let target = targets.iter().find(|t| t.webhook == name).unwrap();
        let (where_, reason) = match form.refused {
            Refused::Reconcile(range) => {
                let message = &reasons[i];
                assert!(
                    message.contains(&format!("is a {range} address")),
                    "{}: {message}",
                    form.url
                );
                assert_eq!(target.state, TargetState::Held, "{}", form.url);
                assert_eq!(target.attempts, 0, "{}", form.url);
                let error = target.error.as_deref().unwrap_or_default();
                assert!(error.contains(range), "{}: {error}", form.url);
                (
                    "reconcile",
                    format!("Ready=False EgressNotAllowed: {message}"),
                )
            }
            Refused::Connect(range) => {
                let record = eventually(&format!("{name}'s attempt in its history"), WAIT, || {
                    first_attempt(&webhooks, &name)
                })
                .await;
                let error = record.error.unwrap_or_default();
                assert!(
                    record.http_status.is_none()
                        && error.contains("resolves only to refused addresses")
                        && error.contains(&format!("is a {range} address")),
                    "{}: {error}",
                    form.url
                );
                ("connect", format!("attempt error: {error}"))
            }
            Refused::Redirect => {
                let record = eventually(&format!("{name}'s attempt in its history"), WAIT, || {
                    first_attempt(&webhooks, &name)
                })
                .await;
                assert_eq!(record.http_status, Some(302), "{}", form.url);
                (
                    "response",
                    format!(
                        "attempt ended with HTTP 302 ({:?}), Location not followed",
                        record.outcome
                    ),
                )
            }
        };
        table.push(format!(
            "| {} | `{}` | {where_} | {} |",
            form.form,
            form.url,
            reason.replace('|', "\\|")
        ));
    }
    assert!(
        !redirect_requests.lock().unwrap().is_empty(),
        "the redirecting endpoint was reached"
    );
    // And no Webhook reports a success.
    for w in webhooks.list(&ListParams::default()).await.unwrap() {
        let name = w.metadata.name.clone().unwrap_or_default();
        if name.starts_with("control") {
            continue;
        }
        let succeeded = w.status.map(|s| s.delivery_stats.succeeded).unwrap_or(0);
        assert_eq!(succeeded, 0, "{name}");
    }

    eprintln!("SSRF table (canary 127.0.0.1 and [::1] port {canary_port}):");
    eprintln!("| form | url | refused at | reason |");
    eprintln!("|---|---|---|---|");
    for row in &table {
        eprintln!("{row}");
    }
    eprintln!(
        "FIGURES every_url_form_of_a_blocked_address_is_refused_and_the_canary_sees_nothing: \
         sent={} delivered=0 duplicates=- lost=- recover_s=- forms={} canary_requests={} \
         controls_delivered={} build=debug",
        forms.len(),
        forms.len(),
        seen.len(),
        control_requests.lock().unwrap().len()
    );
}

async fn create_signing_secret(client: &Client, ns: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "signing", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": "ssrf-test-signing-secret-0123456789"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

// The guard sits in the one HTTP client every ingest mode delivers through: events posted to
// `POST /api/events` in direct, durable and jetstream modes meet the same refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_redirects_to_blocked_addresses_are_refused_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    let (mut canary_total, mut controls_total) = (0, 0);
    for mode in INGEST_MODES {
        let ns = cp.namespace("ssrf-mode").await;
        let (canary_port, canary_requests) = canary().await;
        let (redirect, _) = redirector(format!("http://127.0.0.1:{canary_port}/redirected")).await;
        let (control_port, control_requests) = canary().await;
        let op = ModeOperator::start(cp, mode, &[&ns], |args| {
            let redirect_ip = redirect.ip();
            let control: std::net::IpAddr = CONTROL_IP.parse().unwrap();
            args.allow_cidrs = vec![redirect_ip.into(), control.into()];
            args.test_address_map = vec![
                (redirect_ip.into(), redirect_ip),
                ("0.0.0.0/0".parse().unwrap(), "127.0.0.1".parse().unwrap()),
                ("::/0".parse().unwrap(), "::1".parse().unwrap()),
            ];
            args.test_resolve = TEST_NAMES
                .iter()
                .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
                .collect();
        })
        .await;
        create_signing_secret(&client, &ns).await;
        let connect = [
            ("loopback", "loopback.test", "loopback"),
            ("loopback6", "loopback6.test", "loopback"),
            ("rebind", "rebind.test", "private"),
            ("metadata", "metadata.test", "link-local (cloud metadata)"),
            ("ula", "ula.test", "unique local (private)"),
        ];
        for (name, host, _) in connect {
            let url = format!("http://{host}:{canary_port}/hook");
            create_webhook(&client, &ns, name, &url).await;
        }
        create_webhook(
            &client,
            &ns,
            "decimal",
            &format!("http://2130706433:{canary_port}/"),
        )
        .await;
        create_webhook(&client, &ns, "redirect", &format!("http://{redirect}/hook")).await;
        let control = format!("http://control.test:{control_port}/hook");
        create_webhook(&client, &ns, "control", &control).await;
        for (name, _, _) in connect {
            wait_ready_reason(&client, &ns, name, "True", "Routed").await;
        }
        wait_ready_reason(&client, &ns, "redirect", "True", "Routed").await;
        wait_ready_reason(&client, &ns, "control", "True", "Routed").await;
        let message = wait_ready_reason(&client, &ns, "decimal", "False", "EgressNotAllowed").await;
        assert!(
            message.contains("127.0.0.1 is a loopback address"),
            "{mode:?}: {message}"
        );

        op.post_event(&ns, "document.completed", json!({"document_id": 1}))
            .await;
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        for (name, host, range) in connect {
            let record = eventually(&format!("{mode:?}: {name}'s attempt"), WAIT, || {
                first_attempt(&webhooks, name)
            })
            .await;
            let error = record.error.unwrap_or_default();
            assert!(
                error.contains(&format!("{host} resolves only to refused addresses"))
                    && error.contains(&format!("is a {range} address")),
                "{mode:?} {name}: {error}"
            );
        }
        let record = eventually(&format!("{mode:?}: the redirect's attempt"), WAIT, || {
            first_attempt(&webhooks, "redirect")
        })
        .await;
        assert_eq!(record.http_status, Some(302), "{mode:?}");
        eventually(
            &format!("{mode:?}: the control delivered"),
            WAIT,
            || async { (!control_requests.lock().unwrap().is_empty()).then_some(()) },
        )
        .await;
        let seen = canary_requests.lock().unwrap().clone();
        assert!(
            seen.is_empty(),
            "{mode:?}: the canary got requests: {seen:?}"
        );
        canary_total += seen.len();
        controls_total += control_requests.lock().unwrap().len();
        op.op.stop().await;
    }
    eprintln!(
        "FIGURES names_and_redirects_to_blocked_addresses_are_refused_in_every_ingest_mode: \
         sent=21 delivered=0 duplicates=- lost=- recover_s=- modes=direct,durable,jetstream \
         forms_per_mode=7 canary_requests={canary_total} controls_delivered={controls_total} build=debug"
    );
}

/// Private, link-local, metadata and other special addresses, judged by the decision functions
/// only (`check_url` for URLs, `check_ip` for resolved addresses): nothing connects.
#[test]
fn addresses_outside_loopback_are_refused_by_the_decision_function() {
    let policy = EgressPolicy::new(true, vec![]);
    let urls = [
        ("http://10.0.0.1/", "private"),
        ("http://10.255.255.255/", "private"),
        ("http://012.0.0.1/", "private"),
        ("http://0xa000001/", "private"),
        ("http://167772161/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://172.31.255.254/", "private"),
        ("http://192.168.0.1/", "private"),
        ("http://192.168.1/", "private"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "link-local (cloud metadata)",
        ),
        ("http://0xa9fea9fe/", "link-local (cloud metadata)"),
        ("http://0251.0376.0251.0376/", "link-local (cloud metadata)"),
        ("http://169.254.43518/", "link-local (cloud metadata)"),
        (
            "http://[::ffff:169.254.169.254]/",
            "link-local (cloud metadata)",
        ),
        ("http://[::ffff:a9fe:a9fe]/", "link-local (cloud metadata)"),
        (
            "http://[64:ff9b::169.254.169.254]/",
            "link-local (cloud metadata)",
        ),
        ("http://[fd00:ec2::254]/", "unique local (private)"),
        ("http://100.64.0.1/", "shared (carrier-grade NAT)"),
        ("http://100.100.100.200/", "shared (carrier-grade NAT)"),
        ("http://0.0.0.0/", "\"this network\""),
        ("http://0/", "\"this network\""),
        ("http://[::]/", "unspecified"),
        ("http://[fc00::1]/", "unique local (private)"),
        ("http://[fd12:3456::1]/", "unique local (private)"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fec0::1]/", "site-local (deprecated private)"),
        ("http://[::10.0.0.1]/", "IPv4-compatible"),
        ("http://[64:ff9b:1::a00:1]/", "local-use NAT64"),
        ("http://[::ffff:192.168.0.1]/", "private"),
        ("http://224.0.0.1/", "multicast"),
        ("http://255.255.255.255/", "reserved"),
        ("http://198.18.0.1/", "benchmarking"),
        ("http://192.0.0.8/", "IETF protocol assignment"),
        ("http://[ff02::1]/", "multicast"),
    ];
    eprintln!("| url | refused by check_url as |");
    eprintln!("|---|---|");
    for (url, range) in urls {
        match policy.check_url(url) {
            Err(EgressDenied::BlockedAddress { range: r, .. }) => {
                assert_eq!(r, range, "{url}");
                eprintln!("| `{url}` | {r} |");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    // The same ranges as a resolver's answer, judged at connect time.
    eprintln!("| resolved address | refused by check_ip as |");
    eprintln!("|---|---|");
    for (ip, range) in [
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("0.0.0.0", "\"this network\""),
        ("::", "unspecified"),
        ("fc00::1", "unique local (private)"),
        ("fe80::1", "link-local"),
        ("::a00:1", "IPv4-compatible"),
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        match policy.check_ip(ip) {
            Err(EgressDenied::BlockedAddress { range: r, .. }) => {
                assert_eq!(r, range, "{ip}");
                eprintln!("| `{ip}` | {r} |");
            }
            other => panic!("{ip}: {other:?}"),
        }
    }
    // An --egress-allow-cidr opens exactly its range, in every spelling.
    let open = EgressPolicy::new(true, vec!["10.1.0.0/16".parse().unwrap()]);
    assert!(open.check_url("http://10.1.2.3/").is_ok());
    assert!(open.check_url("http://[::ffff:10.1.2.3]/").is_ok());
    assert!(open.check_url("http://10.2.0.1/").is_err());
    assert!(open.check_url("http://169.254.169.254/").is_err());
}
