//! `hookrelay run`: the operator's flags and the wiring of its tasks.

use std::net::SocketAddr;

use clap::Args;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Client, api::Api, core::crd::CustomResourceExt};
use tokio_util::sync::CancellationToken;

use crate::{
    crd::{DocumentEvent, Webhook},
    http,
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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the {crd} CRD is not installed: install crds/ (kubectl apply -f crds/) or the Helm chart first"
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

/// Runs the operator until `shutdown` fires.
pub async fn run(client: Client, args: RunArgs, shutdown: CancellationToken) -> Result<(), Error> {
    check_crds(&client).await?;
    let readiness = http::Readiness::new(&[]);
    let metrics = http::serve(
        args.metrics_addr,
        http::metrics_router(readiness.clone()),
        shutdown.clone(),
    );
    metrics.await.map_err(|source| Error::Listen {
        addr: args.metrics_addr,
        source,
    })
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
