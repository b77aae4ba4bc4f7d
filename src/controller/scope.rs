//! Which namespaces the operator watches, and the watch streams over them.

use std::sync::Arc;

use futures::{Stream, StreamExt, stream::BoxStream};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, DefaultBackoff},
    },
};

/// Which namespaces the operator watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespaces(Vec<String>),
}

impl Scope {
    pub fn new(namespaces: &[String]) -> Self {
        if namespaces.is_empty() {
            Scope::All
        } else {
            Scope::Namespaces(namespaces.to_vec())
        }
    }

    /// The namespace each watch stream covers (None: all), by stream index.
    pub fn coverage(&self) -> Vec<Option<Arc<str>>> {
        match self {
            Scope::All => vec![None],
            Scope::Namespaces(list) => list.iter().map(|ns| Some(Arc::from(ns.as_str()))).collect(),
        }
    }

    /// One watch per watched namespace (or one over all of them), merged into one stream; each
    /// event carries the index of its stream (see [`Scope::coverage`]) and has been passed
    /// through `trim`, which drops what the consumer does not keep; `config` selects (labels). Watch errors are logged and
    /// retried with backoff, never ending the stream.
    pub fn watch<K>(
        &self,
        client: &Client,
        config: watcher::Config,
        trim: fn(&mut K),
    ) -> BoxStream<'static, (usize, watcher::Event<K>)>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
        K::DynamicType: Default,
    {
        let apis: Vec<Api<K>> = match self {
            Scope::All => vec![Api::all(client.clone())],
            Scope::Namespaces(list) => list
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect(),
        };
        let streams = apis.into_iter().enumerate().map(move |(i, api)| {
            retried(watcher::watcher(api, config.clone()), DefaultBackoff::default())
                .filter_map(move |event| async move {
                    match event {
                        Ok(event) => Some((i, event.modify(trim))),
                        Err(error) if is_expired(&error) => {
                            tracing::info!(kind = %K::kind(&Default::default()), %error, "watch expired; relisting");
                            None
                        }
                        Err(error) => {
                            tracing::warn!(kind = %K::kind(&Default::default()), %error, "watch failed; retrying with backoff");
                            None
                        }
                    }
                })
                .boxed()
        });
        futures::stream::select_all(streams).boxed()
    }
}

/// "410 Gone" (too old resource version): the API server answered, and the watcher starts over
/// with a relist.
fn is_expired(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(status) if status.code == 410)
}

/// A watch stream whose failures wait out `backoff` before the watcher tries again, except
/// "410 Gone", which resets it: that is the API server answering, typically right after it
/// restarted with a fresh watch cache. Counted as one more failure, it doubled a backoff grown
/// during the outage, and the relist came 25 s after a 10 s outage had ended (the
/// faults_control_plane e2e test); the error is still passed on, to be logged.
fn retried<T, B: Backoff>(
    stream: impl Stream<Item = Result<T, watcher::Error>>,
    backoff: B,
) -> impl Stream<Item = Result<T, watcher::Error>> {
    stream
        .map(|item| match item {
            Err(error) if is_expired(&error) => Ok(Err(error)),
            other => other.map(Ok),
        })
        .backoff(backoff)
        .map(|item| item.and_then(|inner| inner))
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// 10 s per failure, counting the waits.
    struct CountingBackoff(Arc<AtomicUsize>);

    impl Iterator for CountingBackoff {
        type Item = Duration;
        fn next(&mut self) -> Option<Duration> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Some(Duration::from_secs(10))
        }
    }

    impl Backoff for CountingBackoff {
        fn reset(&mut self) {}
    }

    fn gone() -> watcher::Error {
        let mut status = kube::core::Status::failure("too old resource version", "Expired");
        status.code = 410;
        watcher::Error::WatchError(Box::new(status))
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_watch_relists_without_waiting_out_the_backoff() {
        let waits = Arc::new(AtomicUsize::new(0));
        let items = futures::stream::iter([
            Err(watcher::Error::NoResourceVersion),
            Err(watcher::Error::NoResourceVersion),
            Err(gone()),
            Ok(1),
        ]);
        let out: Vec<_> = retried(items, CountingBackoff(waits.clone()))
            .collect()
            .await;
        let shapes: Vec<_> = out
            .iter()
            .map(|r| r.as_ref().map_err(is_expired).copied())
            .collect();
        assert_eq!(shapes, [Err(false), Err(false), Err(true), Ok(1)]);
        assert_eq!(
            waits.load(Ordering::SeqCst),
            2,
            "only the two failures wait; the 410 (the server is back) is retried at once"
        );
    }
}
