//! `hookrelay run`: the operator's flags and the wiring of its tasks.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Args;
use ipnet::IpNet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Client, api::Api, core::crd::CustomResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{DocumentEventController, Retention, Scope, WebhookController},
    crd::{DocumentEvent, Webhook},
    delivery::{Dispatcher, DispatcherConfig, EgressPolicy, HttpSender},
    http,
    metrics::Metrics,
    routing::Routes,
    status::{self, WriterConfig},
};

/// Flags of `hookrelay run`; each also reads an environment variable.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Address of the REST API and event ingest.
    #[arg(long, env = "HOOKRELAY_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// `durable`: store ingested events as DocumentEvents before replying (at-least-once);
    /// `direct`: dispatch them from memory (lowest latency, at-most-once across a restart).
    #[arg(
        long,
        env = "HOOKRELAY_INGEST_MODE",
        value_enum,
        default_value = "durable"
    )]
    pub ingest_mode: http::IngestMode,

    /// Deliveries direct ingest may hold before it answers 429.
    #[arg(long, env = "HOOKRELAY_DIRECT_QUEUE", default_value_t = 10_000)]
    pub direct_queue: usize,

    /// Deliveries one namespace may hold in the direct queue, so that one tenant (a paused
    /// Webhook, a dead endpoint) cannot take it all; default: a quarter of --direct-queue.
    #[arg(long, env = "HOOKRELAY_DIRECT_QUEUE_PER_NAMESPACE")]
    pub direct_queue_per_namespace: Option<usize>,

    /// How long a direct delivery is held for a paused or blocked Webhook before it gives up
    /// (and frees its place in the queue).
    #[arg(long, env = "HOOKRELAY_DIRECT_MAX_HOLD", default_value = "60s", value_parser = humantime::parse_duration)]
    pub direct_max_hold: Duration,

    /// DEVELOPMENT ONLY: serve the REST API and ingest without authentication or authorization.
    #[arg(long, env = "HOOKRELAY_DISABLE_AUTH")]
    pub disable_auth: bool,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HOOKRELAY_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Watch only this namespace (repeatable); all namespaces when absent.
    #[arg(long = "namespace", env = "HOOKRELAY_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Allow plain-http webhook URLs (otherwise only https).
    #[arg(long, env = "HOOKRELAY_ALLOW_HTTP")]
    pub allow_http: bool,

    /// Delete delivered DocumentEvents this long after completion; 0 keeps them.
    #[arg(long, env = "HOOKRELAY_EVENT_RETENTION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,

    /// Delete DocumentEvents whose delivery failed this long after completion; 0 keeps them.
    #[arg(long, env = "HOOKRELAY_FAILED_EVENT_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub failed_event_retention: Duration,

    /// A private or special range deliveries may reach, e.g. 10.0.0.0/8 (repeatable).
    #[arg(
        long = "allow-cidr",
        env = "HOOKRELAY_ALLOW_CIDR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub allow_cidrs: Vec<IpNet>,
}

impl RunArgs {
    /// The defaults, with the metrics server on an ephemeral loopback port (for tests).
    pub fn for_tests() -> Self {
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("a valid address"),
            ingest_mode: http::IngestMode::Durable,
            direct_queue: 10_000,
            direct_queue_per_namespace: None,
            direct_max_hold: Duration::from_secs(60),
            disable_auth: false,
            metrics_addr: "127.0.0.1:0".parse().expect("a valid address"),
            namespaces: Vec::new(),
            allow_http: false,
            allow_cidrs: Vec::new(),
            event_retention: Duration::from_secs(600),
            failed_event_retention: Duration::from_secs(86400),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the {crd} CRD is not installed: install crds/ (kubectl apply --server-side -f crds/) or the Helm chart first"
    )]
    CrdMissing { crd: String },
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serve on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a running operator shares with its callers (the binary, in-process tests).
#[derive(Clone)]
pub struct Operator {
    pub routes: Routes,
    pub readiness: http::Readiness,
    pub metrics: Metrics,
    pub metrics_addr: SocketAddr,
    pub listen_addr: SocketAddr,
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
    let metrics = Metrics::default();
    let client = metrics.instrumented_client(config)?;
    check_crds(&client).await?;
    let readiness = http::Readiness::new(&["secrets", "webhooks", "documentevents"]);
    let routes = Routes::default();
    let scope = Scope::new(&args.namespaces);
    let egress = EgressPolicy::new(args.allow_http, args.allow_cidrs.clone());

    let (metrics_listener, metrics_addr) = bind(args.metrics_addr).await?;
    let (api_listener, listen_addr) = bind(args.listen_addr).await?;

    let (status, writer) = status::channel(
        client.clone(),
        metrics.clone(),
        WriterConfig::default(),
        4096,
    );
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let dispatcher = Arc::new(Dispatcher::new(
        HttpSender::new(egress.clone()),
        status.clone(),
        gone_tx,
        metrics.clone(),
        DispatcherConfig::default(),
    ));
    let auth = if args.disable_auth {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (--disable-auth): anyone who reaches {listen_addr} can manage webhooks and send events. Development only."
        );
        http::Authorizer::Disabled
    } else {
        http::Authorizer::kubernetes(client.clone())
    };
    let api_state = Arc::new(http::ApiState {
        client: client.clone(),
        auth,
        routes: routes.clone(),
        dispatcher: dispatcher.clone(),
        ingest_mode: args.ingest_mode,
        direct: http::DirectIngest::new(
            args.direct_queue,
            args.direct_queue_per_namespace
                .unwrap_or(args.direct_queue / 4)
                .max(1),
        ),
        direct_max_hold: args.direct_max_hold,
        readiness: readiness.clone(),
        metrics: metrics.clone(),
    });
    let webhooks = WebhookController::new(
        &scope,
        routes.clone(),
        egress,
        status.clone(),
        readiness.clone(),
        metrics.clone(),
    );
    let events = DocumentEventController::new(
        client.clone(),
        &scope,
        routes.clone(),
        dispatcher,
        status,
        readiness.clone(),
        metrics.clone(),
        Retention {
            delivered: nonzero(args.event_retention),
            failed: nonzero(args.failed_event_retention),
        },
    );

    // The writer stops last, after the producers, so that what they sent is written.
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(writer.run(writer_stop.clone()));
    let routes_synced = {
        let readiness = readiness.clone();
        async move { readiness.synced("webhooks").await }
    };
    let webhooks = tokio::spawn(webhooks.run(client, scope.clone(), gone_rx, shutdown.clone()));
    let events = tokio::spawn(events.run(scope, routes_synced, shutdown.clone()));
    let metrics_server = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(readiness.clone(), metrics.clone()),
        shutdown.clone(),
    ));
    let api_server = tokio::spawn(http::serve(
        api_listener,
        http::api_router(api_state),
        shutdown.clone(),
    ));

    let operator = Operator {
        routes,
        readiness,
        metrics,
        metrics_addr,
        listen_addr,
    };
    let task = async move {
        let served = [metrics_server.await, api_server.await];
        let _ = events.await;
        let _ = webhooks.await;
        writer_stop.cancel();
        let _ = writer.await;
        for (result, addr) in served.into_iter().zip([metrics_addr, listen_addr]) {
            if let Ok(Err(source)) = result {
                return Err(Error::Listen { addr, source });
            }
        }
        Ok(())
    };
    Ok((operator, task))
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
