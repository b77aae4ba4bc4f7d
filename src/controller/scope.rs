//! Which namespaces the operator watches, and the watch streams over them.

use std::sync::Arc;

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
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
            watcher(api, config.clone())
                .default_backoff()
                .filter_map(move |event| async move {
                    match event {
                        Ok(event) => Some((i, event.modify(trim))),
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
