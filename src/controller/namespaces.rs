//! Keeps [`KnownNamespaces`] true from a watch of the Namespaces' metadata (all-namespaces
//! mode only: with `--watch-namespace` the watched list is the answer).

use std::collections::HashSet;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use crate::ports::KnownNamespaces;

/// Watches Namespaces until `stop`. Without the right to list them the set stays unknown, and
/// the API then relies on the per-caller review budget alone (a warning says so).
pub async fn watch_namespaces(client: Client, known: KnownNamespaces, stop: CancellationToken) {
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<HashSet<String>> = None;
    let mut warned = false;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "cannot watch Namespaces: the API cannot refuse unknown namespaces before reviewing the caller (grant list and watch on namespaces)");
                }
            }
            Some(Ok(event)) => match event {
                watcher::Event::Init => listing = Some(HashSet::new()),
                watcher::Event::InitApply(ns) => {
                    if let Some(listing) = &mut listing {
                        listing.insert(ns.name_any());
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(listed) = listing.take() {
                        known.replace(listed);
                    }
                }
                watcher::Event::Apply(ns) => known.insert(ns.name_any()),
                watcher::Event::Delete(ns) => known.remove(&ns.name_any()),
            },
        }
    }
}
