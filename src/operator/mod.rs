//! `hookrelay run`: the operator's flags and the wiring of its tasks.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Client, api::Api, core::crd::CustomResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod flags;
mod supervise;
mod tasks;

pub use flags::{
    MAX_PERIOD, RENAMED_FLAGS, RunArgs, TEST_SEAM_VARIABLES, adopt_renamed_flags, parse_period,
    parse_size,
};
pub use supervise::{Essential, IntoTaskResult, supervise};
use tasks::{deliver_document_events, publish_leadership, serial_lane, start_election};

use crate::{
    controller::{DocumentEventController, Retention, Scope, WebhookController},
    crd::{DocumentEvent, Webhook},
    delivery::{self, Dispatcher, DispatcherConfig, EgressPolicy, HttpSender, jetstream},
    health, http,
    leader::{LeaderTerms, Leadership},
    metrics::Metrics,
    ports::{CreatedEvents, Recoveries},
    routing::{FilterBudget, Routes},
    status::{self, StatusSender, WriterConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the {crd} CRD is not installed: install crds/ (kubectl apply --server-side -f crds/) or the Helm chart first"
    )]
    CrdMissing { crd: String },
    #[error(
        "{variable} is set, but it is a test seam and this build has none (they exist only with the cargo feature test-seams): unset it"
    )]
    TestSeamInRelease { variable: &'static str },
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "TLS: {0} (--tls-cert-file and --tls-key-file take PEM files, a certificate and its key)"
    )]
    Tls(String),
    #[error("cannot serve on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "leader election needs --lease-retry-period < --lease-renew-deadline < --lease-duration (got {retry:?}, {renew:?}, {lease:?})"
    )]
    LeaseTimings {
        retry: Duration,
        renew: Duration,
        lease: Duration,
    },
    #[error(
        "--ingest-mode jetstream needs --nats-url (HOOKRELAY_NATS_URL), for example nats://nats.nats:4222"
    )]
    NatsUrlMissing,
    #[error(transparent)]
    NatsStream(#[from] jetstream::InvalidStreamName),
    #[error("JetStream: {0}")]
    Bus(#[from] jetstream::BusError),
    #[error("the {task} task ended unexpectedly ({why}); stopping so that a restart recovers")]
    TaskEnded { task: &'static str, why: String },
}

/// What a running operator shares with its callers (the binary, in-process tests).
#[derive(Clone)]
pub struct Operator {
    pub routes: Routes,
    pub leadership: Leadership,
    pub readiness: health::Readiness,
    pub liveness: health::Liveness,
    pub metrics: Metrics,
    pub metrics_addr: SocketAddr,
    pub listen_addr: SocketAddr,
    /// The API's authenticator (its review counts, for tests).
    pub auth: http::Authorizer,
}

/// Runs the operator until `shutdown` fires.
pub async fn run(
    config: kube::Config,
    args: RunArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (_, task) = start(config, args, shutdown).await?;
    task.await
}

/// Checks the cluster, binds the servers and starts every task; the returned future completes
/// when they have all stopped after `shutdown`.
pub async fn start(
    config: kube::Config,
    args: RunArgs,
    shutdown: CancellationToken,
) -> Result<(Operator, impl Future<Output = Result<(), Error>>), Error> {
    // Before touching the cluster: a flag mistake is reported as such.
    check_flags(&args)?;
    let metrics = Metrics::default();
    let client = metrics.instrumented_client(config)?;
    check_crds(&client).await?;
    let bus = connect_bus(&args).await?;
    let tls = load_tls(&args, &shutdown)?;
    let (metrics_listener, metrics_addr) = bind(args.metrics_addr).await?;
    let (api_listener, listen_addr) = bind(args.listen_addr).await?;
    let (terms, leadership) = if args.leader_elect {
        let (terms, leadership) = Leadership::elected();
        (Some(terms), leadership)
    } else {
        (None, Leadership::always())
    };
    let routes = Routes::with_filter_budget(FilterBudget {
        per_event: args.filter_timeout,
        per_namespace: args.filter_time_per_namespace,
    });
    // With leader election, a standby never syncs DocumentEvents: it is ready once it can
    // route (and so serve the API).
    let readiness = if args.leader_elect {
        health::Readiness::new(&["secrets", "webhooks"])
    } else {
        health::Readiness::new(&["secrets", "webhooks", "documentevents"])
    }
    .with_view(routes.view().clone());
    let liveness = health::Liveness::default();
    let (local_status, writer) = status::channel(
        client.clone(),
        metrics.clone(),
        WriterConfig::default(),
        4096,
        leadership.clone(),
    );
    let (status, relay) = attempt_records(bus.as_ref(), &local_status, &metrics);
    report_filter_failures(&routes, &local_status);
    let egress = EgressPolicy::new(args.allow_http, args.allow_cidrs.clone());
    let (dispatcher, gone_rx) = dispatcher(&args, egress.clone(), &routes, &status, &metrics);
    let shared = Shared {
        step_down_grace: step_down_grace(&args),
        scope: Scope::new(&args.namespaces),
        args,
        client,
        metrics,
        routes,
        readiness,
        leadership,
        dispatcher,
        status,
        local_status,
        shutdown,
    };
    let Shared {
        args,
        client,
        metrics,
        routes,
        readiness,
        leadership,
        shutdown,
        scope,
        ..
    } = &shared;
    // `status.blockedKeys` of Webhooks with spec.ordering, from this process's queues (only the
    // leader's writer writes; the leader delivers every ordered delivery).
    tokio::spawn(
        shared
            .dispatcher
            .sequencer()
            .report_blocked(shared.status.clone(), shutdown.clone()),
    );
    let mut auth = authorizer(args, client, listen_addr);
    if *scope == Scope::All && !args.disable_auth {
        let known = crate::ports::KnownNamespaces::default();
        auth = auth.knowing(known.clone());
        tokio::spawn(crate::controller::watch_namespaces(
            client.clone(),
            known,
            shutdown.clone(),
        ));
    }
    if tls.is_none() {
        tracing::info!(
            "the API on {listen_addr} is plain HTTP (development, or behind a TLS-terminating proxy); give --tls-cert-file and --tls-key-file to serve HTTPS"
        );
    }
    let (created_events, created) = CreatedEvents::channel();
    let (recoveries, recoveries_rx) = Recoveries::channel();
    let (api_state, direct_deliveries) = api_state(
        &shared,
        bus.clone(),
        auth.clone(),
        created_events,
        recoveries,
    );
    let limits = http::ServeLimits {
        header_read_timeout: args.header_read_timeout,
        max_connections: args.max_connections,
    };
    let webhooks = WebhookController::new(
        scope,
        routes.clone(),
        egress,
        shared.status.clone(),
        readiness.clone(),
        metrics.clone(),
    )
    .with_sequencer(shared.dispatcher.sequencer());
    let bus_tasks = bus.map(|bus| spawn_bus_tasks(&shared, bus, relay));
    let events = document_event_controller(&shared, created, recoveries_rx);

    // The writer stops last, after the producers, so that what they sent is written.
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(writer.run(writer_stop.clone()));
    tokio::spawn(publish_leadership(
        leadership.clone(),
        metrics.leader.clone(),
    ));
    let elector = terms.map(|terms| start_election(args, client, terms));
    tokio::spawn(crate::controller::watch_view(
        client.clone(),
        scope.clone(),
        routes.view().clone(),
        metrics.clone(),
        args.view_stale_after,
        shutdown.clone(),
    ));
    let webhooks = tokio::spawn(webhooks.run(
        client.clone(),
        scope.clone(),
        gone_rx,
        leadership.clone(),
        shutdown.clone(),
    ));
    let events = tokio::spawn(deliver_document_events(
        events,
        scope.clone(),
        readiness.clone(),
        LeaderTerms::new(leadership.clone(), shutdown.clone()),
    ));
    let metrics_server = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(readiness.clone(), liveness.clone(), metrics.clone()),
        limits,
        None,
        shutdown.clone(),
    ));
    let api_server = tokio::spawn(http::serve(
        api_listener,
        http::api_router(api_state),
        limits,
        tls,
        shutdown.clone(),
    ));

    // In the order they stop: the controllers and direct deliveries on `shutdown`, then the
    // writer, then (once status is written) the Lease is released, so a standby takes over at
    // once. The servers drain last, so that an API request in flight does not hold up the
    // flush and the Lease release.
    let (bus_producers, bus_recording) = bus_tasks.map(BusTasks::essentials).unwrap_or_default();
    let mut tasks = vec![Essential::new("DocumentEvent controller", events, None)];
    tasks.extend(bus_producers);
    tasks.push(Essential::new("Webhook controller", webhooks, None));
    if let Some(task) = direct_deliveries {
        tasks.push(Essential::new("direct deliveries", task, None));
    }
    tasks.extend(bus_recording);
    tasks.push(Essential::new("status writer", writer, None).stopped_by(writer_stop));
    if let Some((task, stop)) = elector {
        tasks.push(Essential::new("leader election", task, None).stopped_by(stop));
    }
    tasks.push(Essential::new("API server", api_server, Some(listen_addr)));
    tasks.push(Essential::new(
        "metrics server",
        metrics_server,
        Some(metrics_addr),
    ));
    let operator = Operator {
        routes: routes.clone(),
        leadership: leadership.clone(),
        readiness: readiness.clone(),
        liveness: liveness.clone(),
        metrics: metrics.clone(),
        metrics_addr,
        listen_addr,
        auth,
    };
    let task = supervise(tasks, shutdown.clone(), liveness, args.shutdown_timeout);
    Ok((operator, task))
}

/// What the operator's tasks are built from: made once by [`start`].
struct Shared {
    args: RunArgs,
    client: Client,
    metrics: Metrics,
    routes: Routes,
    readiness: health::Readiness,
    leadership: Leadership,
    scope: Scope,
    dispatcher: Arc<Dispatcher>,
    /// Where deliveries' records go: the stream in jetstream mode, else `local_status`.
    status: StatusSender,
    /// This process's status writer.
    local_status: StatusSender,
    shutdown: CancellationToken,
    /// Attempts being sent when a term of leadership ends get this long; then another replica
    /// may lead.
    step_down_grace: Duration,
}

fn step_down_grace(args: &RunArgs) -> Duration {
    if args.leader_elect {
        (args.lease_duration.saturating_sub(args.renew_deadline) / 2).min(args.shutdown_timeout / 2)
    } else {
        args.shutdown_timeout / 2
    }
}

/// JetStream, when that is the ingest mode: connected, its stream and consumers set up.
async fn connect_bus(args: &RunArgs) -> Result<Option<jetstream::Bus>, Error> {
    let (http::IngestMode::JetStream, Some(url)) = (args.ingest_mode, &args.nats_url) else {
        return Ok(None);
    };
    let bus = jetstream::connect(&jetstream::BusConfig {
        url: url.clone(),
        creds: args.nats_creds.clone(),
        tls: jetstream::NatsTls {
            ca_file: args.nats_tls_ca_file.clone(),
            cert_file: args.nats_tls_cert_file.clone(),
            key_file: args.nats_tls_key_file.clone(),
        },
        stream: args.nats_stream.clone(),
        max_age: args.nats_max_age,
        max_bytes: args.nats_max_bytes,
        max_messages: args.nats_max_messages,
        max_ack_pending: args.nats_max_ack_pending,
        max_bytes_per_namespace: args
            .nats_max_bytes_per_namespace
            .unwrap_or(args.nats_max_bytes / 4)
            .max(0) as u64,
    })
    .await?;
    Ok(Some(bus))
}

/// Where attempt records go. In jetstream mode every replica delivers: its records go
/// through the stream to the leader's writer (`delivery::records`), relayed by the returned
/// Filter failures (an event over its filter budget) as warning Events on their Webhook.
fn report_filter_failures(routes: &Routes, status: &StatusSender) {
    let status = status.clone();
    routes.screen().report_to(move |report| {
        let event = status::TransitionEvent {
            warning: true,
            reason: "FilterFailed".into(),
            note: report.message,
            object: ObjectReference {
                api_version: Some("hookrelay.dev/v1alpha1".into()),
                kind: Some("Webhook".into()),
                name: Some(report.webhook.name.to_string()),
                namespace: Some(report.webhook.namespace.to_string()),
                uid: Some(report.uid),
                ..Default::default()
            },
        };
        // Dropped when the status channel is full: the log line and the metric remain.
        let _ = status.try_send(status::Update::Note(event));
    });
}

/// task; everything else, and every record in the other modes, goes to the local writer.
fn attempt_records(
    bus: Option<&jetstream::Bus>,
    local_status: &StatusSender,
    metrics: &Metrics,
) -> (StatusSender, Option<delivery::records::AttemptRelay>) {
    match bus {
        Some(bus) => {
            let (status, relay) = delivery::records::relay(
                bus.context.clone(),
                bus.subjects.clone(),
                local_status.clone(),
                metrics.clone(),
                4096,
            );
            (status, Some(relay))
        }
        None => (local_status.clone(), None),
    }
}

/// The dispatcher of every attempt, and where it says that an endpoint answered 410 Gone.
fn dispatcher(
    args: &RunArgs,
    egress: EgressPolicy,
    routes: &Routes,
    status: &StatusSender,
    metrics: &Metrics,
) -> (
    Arc<Dispatcher>,
    mpsc::UnboundedReceiver<delivery::GoneNotice>,
) {
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let dispatcher = Dispatcher::new(
        sender(args, egress),
        routes.clone(),
        status.clone(),
        gone_tx,
        metrics.clone(),
        DispatcherConfig {
            global: args.max_in_flight as usize,
            per_namespace: args.max_in_flight_per_namespace as usize,
            ..DispatcherConfig::default()
        },
    );
    (Arc::new(dispatcher), gone_rx)
}

/// The HTTP sender of every attempt, with the test seams the flags set (warned about loudly).
fn sender(args: &RunArgs, egress: EgressPolicy) -> HttpSender {
    let address_map = delivery::AddressMap::new(args.test_address_map.iter().copied());
    if !address_map.is_empty() {
        tracing::warn!(
            map = ?args.test_address_map,
            "TEST SEAM --test-address-map IS SET: deliveries connect to other addresses than the egress policy approved; never use this outside tests"
        );
    }
    let test_names = delivery::TestNames::new(args.test_resolve.iter().cloned());
    if !test_names.is_empty() {
        tracing::warn!(
            names = ?args.test_resolve,
            "TEST SEAM --test-resolve IS SET: deliveries resolve these names to the given addresses instead of asking DNS; never use this outside tests"
        );
    }
    HttpSender::with_test_seams(egress, address_map, test_names)
}

/// The API's state, and in direct mode the task that stops direct deliveries on shutdown
/// (like the controllers, with the same grace for attempts being sent, before the writer
/// flushes what they recorded).
fn api_state(
    shared: &Shared,
    bus: Option<jetstream::Bus>,
    auth: http::Authorizer,
    created_events: CreatedEvents,
    recoveries: Recoveries,
) -> (Arc<http::ApiState>, Option<tokio::task::JoinHandle<()>>) {
    let args = &shared.args;
    let direct = http::DirectIngest::new(
        args.direct_queue,
        args.direct_queue_per_namespace
            .unwrap_or(args.direct_queue / 4)
            .max(1),
    )
    .with_max_queue_delay(args.direct_max_queue_delay)
    .with_metrics(shared.metrics.clone());
    let direct_deliveries = (args.ingest_mode == http::IngestMode::Direct).then(|| {
        let grace = args.shutdown_timeout / 2;
        tokio::spawn(direct.stop_on(shared.shutdown.clone(), grace))
    });
    let state = http::ApiState {
        client: shared.client.clone(),
        created_events,
        recoveries,
        auth,
        routes: shared.routes.clone(),
        dispatcher: shared.dispatcher.clone(),
        ingest_mode: args.ingest_mode,
        bus,
        jetstream_publishing: http::PublishBudget::new(
            usize::try_from(args.nats_max_publishing).unwrap_or(usize::MAX),
        ),
        direct,
        direct_max_hold: args.direct_max_hold,
        readiness: shared.readiness.clone(),
        leadership: shared.leadership.clone(),
        shutdown: shared.shutdown.clone(),
        metrics: shared.metrics.clone(),
        request_timeout: args.request_timeout,
        test_limiter: http::test_limiter(),
        recover_limiter: http::recover_limiter(),
        history_reads: http::history_reads(),
        trust_client_traces: args.trust_client_traces,
    };
    (Arc::new(state), direct_deliveries)
}

/// The DocumentEvent controller, with its inboxes and graces.
fn document_event_controller(
    shared: &Shared,
    created: mpsc::Receiver<(std::time::Instant, crate::crd::DocumentEvent)>,
    recoveries: mpsc::Receiver<crate::ports::Recovery>,
) -> DocumentEventController {
    let args = &shared.args;
    DocumentEventController::new(
        shared.client.clone(),
        &shared.scope,
        shared.routes.clone(),
        shared.dispatcher.clone(),
        shared.status.clone(),
        shared.readiness.clone(),
        shared.metrics.clone(),
        Retention {
            delivered: nonzero(args.event_retention),
            failed: nonzero(args.failed_event_retention),
        },
        args.max_hold,
    )
    .with_created_events(created)
    .with_recoveries(recoveries)
    // Half the shutdown deadline for attempts being sent; the rest for status and the Lease.
    .with_in_flight_grace(args.shutdown_timeout / 2)
    .with_leadership(shared.leadership.clone(), shared.step_down_grace)
}

/// The JetStream tasks of one replica.
struct BusTasks {
    router: tokio::task::JoinHandle<Result<(), jetstream::BusError>>,
    deliverer: tokio::task::JoinHandle<Result<(), jetstream::BusError>>,
    serial: tokio::task::JoinHandle<Result<(), jetstream::BusError>>,
    /// Publishes this replica's attempt records to the stream.
    relay: Option<(tokio::task::JoinHandle<()>, CancellationToken)>,
    /// Hands every replica's attempt records to the leader's writer.
    recorder: (
        tokio::task::JoinHandle<Result<(), jetstream::BusError>>,
        CancellationToken,
    ),
}

impl BusTasks {
    /// As essential tasks: those that route and deliver (they stop on the shutdown signal),
    /// and those that carry attempt records to the writer (stopped once the producers have:
    /// the relay publishes their last records, the recorder takes what comes).
    fn essentials(self) -> (Vec<Essential>, Vec<Essential>) {
        let producers = vec![
            Essential::new("JetStream router", self.router, None),
            Essential::new("JetStream deliverer", self.deliverer, None),
            Essential::new("JetStream serial deliverer", self.serial, None),
        ];
        let mut recording = Vec::new();
        if let Some((task, stop)) = self.relay {
            recording.push(Essential::new("JetStream attempt relay", task, None).stopped_by(stop));
        }
        let (task, stop) = self.recorder;
        recording.push(Essential::new("JetStream recorder", task, None).stopped_by(stop));
        (producers, recording)
    }
}

/// JetStream consumers run on every replica, independent of leadership: the stream shares the
/// work. Attempt records reach the leader's writer through the stream (`recorder`).
fn spawn_bus_tasks(
    shared: &Shared,
    bus: jetstream::Bus,
    relay: Option<delivery::records::AttemptRelay>,
) -> BusTasks {
    let Shared {
        args,
        readiness,
        dispatcher,
        leadership,
        ..
    } = shared;
    let recorder_stop = CancellationToken::new();
    let recorder = tokio::spawn(delivery::records::record_attempts(
        bus.recorder.clone(),
        bus.subjects.clone(),
        shared.local_status.clone(),
        leadership.clone(),
        shared.metrics.clone(),
        recorder_stop.clone(),
    ));
    let relay = relay.map(|relay| {
        let stop = CancellationToken::new();
        (tokio::spawn(relay.run(stop.clone())), stop)
    });
    // They stop on the shutdown signal, like the controllers, before the writer flushes.
    let stop = shared.shutdown.clone();
    let synced = || {
        let readiness = readiness.clone();
        async move { readiness.synced("webhooks").await }
    };
    // Nothing held outlives the stream's retention.
    let max_hold = args.max_hold.min(args.nats_max_age);
    let router = tokio::spawn(jetstream::route_events(
        bus.clone(),
        shared.routes.clone(),
        shared.metrics.clone(),
        synced(),
        stop.clone(),
    ));
    let deliverer = tokio::spawn(jetstream::deliver_work(
        bus.work_queue(jetstream::Lane::Shared),
        dispatcher.clone(),
        jetstream::InHandLimits::shared(
            args.nats_max_ack_pending,
            args.max_in_flight_per_namespace as usize,
        ),
        max_hold,
        synced(),
        stop.clone(),
        args.shutdown_timeout / 2,
    ));
    // Rate-limited and ordered Webhooks: delivered by the leader alone, so that one bucket
    // counts every delivery and one process keeps the order; a term that ends stops it.
    let serial = tokio::spawn(serial_lane(
        bus,
        dispatcher.clone(),
        jetstream::InHandLimits::serial(args.nats_max_ack_pending),
        max_hold,
        synced(),
        LeaderTerms::new(leadership.clone(), stop),
        shared.step_down_grace,
    ));
    BusTasks {
        router,
        deliverer,
        serial,
        relay,
        recorder: (recorder, recorder_stop),
    }
}

/// Flag combinations clap cannot check; refused before the cluster is contacted.
fn check_flags(args: &RunArgs) -> Result<(), Error> {
    if args.ingest_mode == http::IngestMode::JetStream {
        if args.nats_url.is_none() {
            return Err(Error::NatsUrlMissing);
        }
        // Its name, lowercased, is the first token of every subject.
        jetstream::Subjects::for_stream(&args.nats_stream)?;
    }
    if args.leader_elect
        && !(args.retry_period < args.renew_deadline && args.renew_deadline < args.lease_duration)
    {
        return Err(Error::LeaseTimings {
            retry: args.retry_period,
            renew: args.renew_deadline,
            lease: args.lease_duration,
        });
    }
    if !cfg!(feature = "test-seams")
        && let Some(variable) = TEST_SEAM_VARIABLES
            .into_iter()
            .find(|v| std::env::var_os(v).is_some())
    {
        return Err(Error::TestSeamInRelease { variable });
    }
    Ok(())
}

/// The API's TLS, reloaded as its files change, when both files are given.
fn load_tls(args: &RunArgs, shutdown: &CancellationToken) -> Result<Option<http::Tls>, Error> {
    match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => http::Tls::load(cert, key, shutdown.clone())
            .map(Some)
            .map_err(Error::Tls),
        (None, None) => Ok(None),
        _ => Err(Error::Tls(
            "give both --tls-cert-file and --tls-key-file, or neither".into(),
        )),
    }
}

/// Who may call the API: the API server decides (TokenReview, SubjectAccessReview), unless
/// `--disable-auth`; both weaker settings say so in the log.
fn authorizer(args: &RunArgs, client: &Client, listen_addr: SocketAddr) -> http::Authorizer {
    if args.disable_auth {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (--disable-auth): anyone who reaches {listen_addr} can manage webhooks and send events. Development only."
        );
    } else if args.token_audience.is_empty() {
        tracing::warn!(
            "--token-audience is empty: tokens for the Kubernetes API itself are accepted, so a token sent to hookrelay can also be used against the API server"
        );
    }
    let auth = if args.disable_auth {
        http::Authorizer::disabled()
    } else {
        http::Authorizer::kubernetes(
            client.clone(),
            http::AuthSettings {
                audience: Some(args.token_audience.clone()),
                max_concurrent_reviews: args.max_concurrent_reviews,
            },
        )
    };
    auth.watching(&args.namespaces)
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    Ok((listener, bound))
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Fails early, with a message saying what to do, when the CRDs are not installed.
async fn check_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [Webhook::crd_name(), DocumentEvent::crd_name()] {
        if crds.get_opt(name).await?.is_none() {
            return Err(Error::CrdMissing {
                crd: name.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jetstream_mode_without_a_nats_url_is_refused_at_start_saying_what_to_set() {
        let mut args = RunArgs::for_tests();
        args.ingest_mode = http::IngestMode::JetStream;
        // Nothing listens there: the flag is checked before any connection.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let Err(error) = start(config, args, CancellationToken::new()).await else {
            panic!("the operator started without --nats-url");
        };
        assert!(matches!(error, Error::NatsUrlMissing), "{error}");
        assert!(error.to_string().contains("--nats-url"), "{error}");
    }

    #[tokio::test]
    async fn a_stream_name_that_cannot_prefix_subjects_is_refused_at_start_saying_why() {
        let mut args = RunArgs::for_tests();
        args.ingest_mode = http::IngestMode::JetStream;
        args.nats_url = Some("nats://127.0.0.1:9".into());
        args.nats_stream = "HOOK.RELAY".into();
        // Nothing listens there: the flag is checked before any connection.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let Err(error) = start(config, args.clone(), CancellationToken::new()).await else {
            panic!("the operator started with a stream name holding a dot");
        };
        assert!(matches!(error, Error::NatsStream(_)), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("--nats-stream \"HOOK.RELAY\" cannot be used: it contains '.'"),
            "{message}"
        );
        // Other modes do not use it.
        args.ingest_mode = http::IngestMode::Durable;
        assert!(check_flags(&args).is_ok());
    }
}
