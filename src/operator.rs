//! `hookrelay run`: the operator's flags and the wiring of its tasks.

use std::net::SocketAddr;

use clap::Args;
use ipnet::IpNet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Client, api::Api, core::crd::CustomResourceExt};
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{Scope, WebhookController},
    crd::{DocumentEvent, Webhook},
    delivery::EgressPolicy,
    http,
    metrics::Metrics,
    routing::Routes,
    status::{self, WriterConfig},
};

/// Flags of `hookrelay run`; each also reads an environment variable.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HOOKRELAY_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Watch only this namespace (repeatable); all namespaces when absent.
    #[arg(long = "namespace", env = "HOOKRELAY_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Allow plain-http webhook URLs (otherwise only https).
    #[arg(long, env = "HOOKRELAY_ALLOW_HTTP")]
    pub allow_http: bool,

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
            metrics_addr: "127.0.0.1:0".parse().expect("a valid address"),
            namespaces: Vec::new(),
            allow_http: false,
            allow_cidrs: Vec::new(),
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
    let readiness = http::Readiness::new(&["secrets", "webhooks"]);
    let routes = Routes::default();
    let scope = Scope::new(&args.namespaces);
    let egress = EgressPolicy::new(args.allow_http, args.allow_cidrs.clone());

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let metrics_addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: args.metrics_addr,
        source,
    })?;

    let (status, writer) = status::channel(
        client.clone(),
        metrics.clone(),
        WriterConfig::default(),
        1024,
    );
    let controller = WebhookController::new(
        &scope,
        routes.clone(),
        egress,
        status,
        readiness.clone(),
        metrics.clone(),
    );

    let writer = tokio::spawn(writer.run(shutdown.clone()));
    let controller = tokio::spawn(controller.run(client, scope, shutdown.clone()));
    let server = http::serve(
        listener,
        http::metrics_router(readiness.clone(), metrics.clone()),
        shutdown.clone(),
    );

    let operator = Operator {
        routes,
        readiness,
        metrics,
        metrics_addr,
    };
    let task = async move {
        let served = server.await;
        // The controller stops first so that the writer can drain what it sent.
        let _ = controller.await;
        let _ = writer.await;
        served.map_err(|source| Error::Listen {
            addr: metrics_addr,
            source,
        })
    };
    Ok((operator, task))
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
