//! The Webhook controller: one task that consumes the Webhook and Secret watches, keeps the
//! routing table, and sends `Ready` conditions to the status writer.
//!
//! It is a state machine over watch events rather than a kube `Controller`: a deleted Webhook
//! must leave the routing table at once (without a finalizer), and a re-list must drop the
//! Webhooks not seen again, which needs the watcher's `Init`/`InitDone` markers. Secrets are
//! synced before the first Webhook is resolved so that startup never reports a Secret missing
//! that merely was not listed yet.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{ObjectReference, Secret, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, ResourceExt, api::ListParams, core::DeserializeGuard, runtime::watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Scope,
    resolve::{
        HEADERS_SECRET_LABEL, KeptSecret, References, Resolution, SERVICE_RECEIVER_LABEL,
        SIGNING_SECRET_LABEL, ServiceInfo, WEBHOOKS_ANNOTATION, ready_reason, resolve_with,
        resource_version,
    },
    rotation::PreviousKeyExpiry,
};
use crate::{
    crd::{PREVIOUS_EXPIRES_ANNOTATION, Suspension, Webhook, merge_condition},
    delivery::{EgressPolicy, GoneNotice},
    health::Readiness,
    keys::WebhookKey,
    leader::Leadership,
    metrics::Metrics,
    routing::{Route, Routes, RoutingTable},
    status::{ReadyUpdate, StatusSender, TransitionEvent, Update},
};

type NamespacedName = (Arc<str>, Arc<str>);

/// Watch events tagged with the index of the stream (one per watched namespace) they came from.
// One lives at a time, on the controller's stack: boxing would allocate per watch event.
#[allow(clippy::large_enum_variant)]
enum Input {
    Secret(usize, watcher::Event<DeserializeGuard<Secret>>),
    Webhook(usize, watcher::Event<DeserializeGuard<Webhook>>),
    HeadersSecret(usize, watcher::Event<DeserializeGuard<Secret>>),
    Service(usize, watcher::Event<DeserializeGuard<Service>>),
}

/// The objects of one kind a Webhook may reference (signing Secrets, headers Secrets, Services), as
/// the watch streams tell them, with a re-list replacing what its stream covers.
struct Referenced<V> {
    objects: HashMap<NamespacedName, V>,
    relists: Vec<Option<HashMap<NamespacedName, V>>>,
    synced: Vec<bool>,
    /// Object -> names of the Webhooks that reference it.
    referrers: HashMap<NamespacedName, BTreeSet<Arc<str>>>,
}

impl<V: PartialEq> Referenced<V> {
    fn new(streams: usize) -> Self {
        Self {
            objects: HashMap::new(),
            relists: (0..streams).map(|_| None).collect(),
            synced: vec![false; streams],
            referrers: HashMap::new(),
        }
    }

    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    fn get(&self, namespace: &Arc<str>, name: &str) -> Option<&V> {
        self.objects.get(&(namespace.clone(), Arc::from(name)))
    }

    /// Takes one watch event; returns the objects whose value changed.
    fn on_event<K: kube::Resource<DynamicType = ()>>(
        &mut self,
        stream: usize,
        covered: Option<&Arc<str>>,
        event: watcher::Event<DeserializeGuard<K>>,
        value: impl Fn(&K) -> V,
    ) -> Vec<NamespacedName> {
        let key = |o: &K| {
            (
                Arc::from(o.namespace().unwrap_or_default().as_str()),
                Arc::from(o.name_any().as_str()),
            )
        };
        match event {
            watcher::Event::Init => {
                self.relists[stream] = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(DeserializeGuard(Ok(o))) => {
                if let Some(relist) = &mut self.relists[stream] {
                    relist.insert(key(&o), value(&o));
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.relists[stream].take().unwrap_or_default();
                let in_scope = |k: &NamespacedName| covered.is_none_or(|ns| *ns == k.0);
                let mut changed: Vec<NamespacedName> = self
                    .objects
                    .keys()
                    .filter(|k| in_scope(k) && !listed.contains_key(*k))
                    .cloned()
                    .collect();
                changed.extend(
                    listed
                        .iter()
                        .filter(|(k, v)| self.objects.get(*k) != Some(v))
                        .map(|(k, _)| k.clone()),
                );
                self.objects.retain(|k, _| !in_scope(k));
                self.objects.extend(listed);
                self.synced[stream] = true;
                changed
            }
            watcher::Event::Apply(DeserializeGuard(Ok(o))) => {
                let (key, value) = (key(&o), value(&o));
                if self.objects.get(&key) == Some(&value) {
                    return Vec::new();
                }
                self.objects.insert(key.clone(), value);
                vec![key]
            }
            watcher::Event::Delete(DeserializeGuard(Ok(o))) => {
                let key = key(&o);
                match self.objects.remove(&key) {
                    Some(_) => vec![key],
                    None => Vec::new(),
                }
            }
            watcher::Event::InitApply(DeserializeGuard(Err(e)))
            | watcher::Event::Apply(DeserializeGuard(Err(e)))
            | watcher::Event::Delete(DeserializeGuard(Err(e))) => {
                tracing::warn!(kind = %K::kind(&()), name = ?e.metadata.name, error = %e.error, "skipping an object that cannot be read");
                Vec::new()
            }
        }
    }

    fn index(&mut self, namespace: &Arc<str>, name: Option<&str>, webhook: &Arc<str>) {
        if let Some(name) = name {
            self.referrers
                .entry((namespace.clone(), Arc::from(name)))
                .or_default()
                .insert(webhook.clone());
        }
    }

    fn unindex(&mut self, namespace: &Arc<str>, name: Option<&str>, webhook: &Arc<str>) {
        let Some(name) = name else { return };
        let key = (namespace.clone(), Arc::from(name));
        if let Some(names) = self.referrers.get_mut(&key) {
            names.remove(webhook);
            if names.is_empty() {
                self.referrers.remove(&key);
            }
        }
    }

    fn referrers(&self, object: &NamespacedName) -> Vec<Arc<str>> {
        self.referrers
            .get(object)
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// How many Webhooks reference `object`, and the first `n` of them by name: what a message
    /// can name without growing with the namespace.
    fn some_referrers(&self, object: &NamespacedName, n: usize) -> (usize, Vec<Arc<str>>) {
        let names = self.referrers.get(object);
        let count = names.map_or(0, BTreeSet::len);
        let first = names.into_iter().flatten().take(n).cloned().collect();
        (count, first)
    }
}

/// The most Webhooks a shared-Secret warning names.
const SHARED_NAMED: usize = 5;

pub struct WebhookController {
    routes: Routes,
    egress: EgressPolicy,
    status: StatusSender,
    readiness: Readiness,
    metrics: Metrics,
    /// The latest Webhook objects, for re-resolving them when their Secret changes.
    webhooks: HashMap<WebhookKey, Arc<Webhook>>,
    /// What Webhooks refer to, as watched.
    refs: Refs,
    /// 410 verdicts by generation, until the status carries them.
    gone: HashMap<WebhookKey, (i64, String)>,
    /// Webhooks whose `Degraded` condition is True (for `hookrelay_webhooks_degraded`).
    degraded: HashSet<WebhookKey>,
    streams: Streams,
    upgrade: UpgradeWarnings,
    /// Only the leader looks Secrets up (and warns); set by `run`.
    leadership: Leadership,
    /// (Webhook uid, Secret name) already warned about as shared (see `warn_if_shared`).
    shared_warned: HashSet<(String, Arc<str>)>,
    /// Removes a rotated Secret's `previous` key when its grace period ends; set by `run`.
    expiry: PreviousKeyExpiry,
    /// The delivery engine's per-key queues (`spec.ordering`): `status.blockedKeys` that they
    /// no longer hold (a previous leader's) is cleared.
    sequencer: Option<Arc<crate::delivery::Sequencer>>,
}

/// The objects Webhooks refer to, each kept per watch stream.
struct Refs {
    /// Signing Secrets (labelled `hookrelay.dev/signing-secret: "true"`).
    signing_secrets: Referenced<KeptSecret>,
    /// `headersFrom` Secrets (their own label).
    headers_secrets: Referenced<KeptSecret>,
    /// `serviceRef` Services.
    services: Referenced<ServiceInfo>,
}

/// The Webhook watch streams, one per namespace watched (or one for all).
struct Streams {
    /// The namespace each stream covers (None: all).
    coverage: Vec<Option<Arc<str>>>,
    /// Keys listed so far in a re-list; resolved when it is done, against the Secrets as they
    /// are then.
    relists: Vec<Option<Vec<WebhookKey>>>,
    /// Per stream, during a relist: the version the table will have seen once it is done.
    versions: Vec<u64>,
    synced: Vec<bool>,
}

/// The warnings after an upgrade about a Secret that exists without the signing label: one
/// per Webhook, from bounded look-ups.
struct UpgradeWarnings {
    /// Set by `run`.
    client: Option<Client>,
    /// Webhooks (by uid) already warned about, so that each is warned about once (shared with
    /// the look-ups, which record what they warned about).
    warned: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Bounds the Secret look-ups behind those warnings (after an upgrade, every Webhook may
    /// need one at once).
    lookups: Arc<tokio::sync::Semaphore>,
    /// (uid, generation) of the Webhooks looked up already: one look-up per spec, not one per
    /// re-resolution.
    looked_up: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

impl WebhookController {
    pub fn new(
        scope: &Scope,
        routes: Routes,
        egress: EgressPolicy,
        status: StatusSender,
        readiness: Readiness,
        metrics: Metrics,
    ) -> Self {
        let coverage = scope.coverage();
        let n = coverage.len();
        Self {
            routes,
            egress,
            status,
            readiness,
            metrics,
            webhooks: HashMap::new(),
            refs: Refs {
                signing_secrets: Referenced::new(n),
                headers_secrets: Referenced::new(n),
                services: Referenced::new(n),
            },
            gone: HashMap::new(),
            degraded: HashSet::new(),
            streams: Streams {
                relists: (0..n).map(|_| None).collect(),
                versions: vec![0; n],
                synced: vec![false; n],
                coverage,
            },
            upgrade: UpgradeWarnings {
                client: None,
                warned: Default::default(),
                lookups: Arc::new(tokio::sync::Semaphore::new(4)),
                looked_up: Default::default(),
            },
            leadership: Leadership::always(),
            shared_warned: HashSet::new(),
            expiry: PreviousKeyExpiry::new(None, Leadership::always()),
            sequencer: None,
        }
    }

    /// Clears `status.blockedKeys` that `sequencer` (this process's ordered deliveries) does
    /// not hold: after a change of leader, the previous leader's list.
    pub fn with_sequencer(mut self, sequencer: Arc<crate::delivery::Sequencer>) -> Self {
        self.sequencer = Some(sequencer);
        self
    }

    /// Runs until `shutdown` fires. `gone` brings the 410 verdicts of the delivery engine.
    pub async fn run(
        mut self,
        client: Client,
        scope: Scope,
        mut gone: mpsc::UnboundedReceiver<GoneNotice>,
        mut leadership: Leadership,
        shutdown: CancellationToken,
    ) {
        // Only Secrets that opted in: others are never read, so a Webhook cannot name (or probe
        // for) any Secret of its namespace, and the operator does not hold every Secret.
        let signing = watcher::Config::default().labels(&format!("{SIGNING_SECRET_LABEL}=true"));
        let mut secrets = scope
            .watch(&client, signing, strip_secret)
            .map(|(i, e)| Input::Secret(i, e));
        let mut webhooks = scope
            .watch(&client, watcher::Config::default(), strip_webhook)
            .map(|(i, e)| Input::Webhook(i, e));
        // Header Secrets opt in with a label of their own, for the same reason.
        let headers = watcher::Config::default().labels(&format!("{HEADERS_SECRET_LABEL}=true"));
        let mut headers_secrets = scope
            .watch(&client, headers, strip_secret)
            .map(|(i, e)| Input::HeadersSecret(i, e));
        // Services opt in as receivers with a label, too: the operator reads no other.
        let receivers =
            watcher::Config::default().labels(&format!("{SERVICE_RECEIVER_LABEL}=true"));
        let mut services = scope
            .watch(&client, receivers, strip_service)
            .map(|(i, e)| Input::Service(i, e));
        self.expiry = PreviousKeyExpiry::new(Some(client.clone()), leadership.clone());
        self.upgrade.client = Some(client);
        self.leadership = leadership.clone();
        loop {
            // Everything a Webhook references is listed before the first Webhook is resolved.
            let synced = self.refs.signing_secrets.all_synced()
                && self.refs.headers_secrets.all_synced()
                && self.refs.services.all_synced();
            let input = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(input) = secrets.next() => input,
                Some(input) = headers_secrets.next() => input,
                Some(input) = services.next() => input,
                Some(input) = webhooks.next(), if synced => input,
                Some(notice) = gone.recv() => {
                    self.on_gone(notice).await;
                    continue;
                }
                true = leadership.changed() => {
                    if leadership.is_leader() {
                        self.resync().await;
                    }
                    continue;
                }
            };
            match input {
                Input::Secret(i, event) => self.on_secret(i, event).await,
                Input::Webhook(i, event) => self.on_webhook(i, event).await,
                Input::HeadersSecret(i, event) => {
                    let covered = self.streams.coverage[i].clone();
                    let changed = self.refs.headers_secrets.on_event(
                        i,
                        covered.as_ref(),
                        event,
                        KeptSecret::of,
                    );
                    for object in changed {
                        let names = self.refs.headers_secrets.referrers(&object);
                        self.re_resolve(&object.0, names).await;
                    }
                }
                Input::Service(i, event) => {
                    let covered = self.streams.coverage[i].clone();
                    let changed = self.refs.services.on_event(
                        i,
                        covered.as_ref(),
                        event,
                        ServiceInfo::from_service,
                    );
                    for object in changed {
                        let names = self.refs.services.referrers(&object);
                        self.re_resolve(&object.0, names).await;
                    }
                }
            }
        }
    }

    async fn on_secret(&mut self, stream: usize, event: watcher::Event<DeserializeGuard<Secret>>) {
        match &event {
            watcher::Event::InitApply(DeserializeGuard(Ok(secret)))
            | watcher::Event::Apply(DeserializeGuard(Ok(secret))) => self.schedule_expiry(secret),
            watcher::Event::Delete(DeserializeGuard(Ok(secret))) => {
                let (namespace, name) = secret_key(secret);
                self.expiry.observe(&namespace, &name, None);
            }
            _ => {}
        }
        let covered = self.streams.coverage[stream].clone();
        let was_synced = self.refs.signing_secrets.all_synced();
        let changed =
            self.refs
                .signing_secrets
                .on_event(stream, covered.as_ref(), event, KeptSecret::of);
        if !was_synced && self.refs.signing_secrets.all_synced() {
            self.readiness.mark_ready("secrets");
        }
        for secret in changed {
            let names = self.refs.signing_secrets.referrers(&secret);
            self.re_resolve(&secret.0, names).await;
        }
    }

    /// Follows the end of a rotation's grace period, if the Secret has one.
    fn schedule_expiry(&mut self, secret: &Secret) {
        // Only Secrets the REST API generated (owned by their Webhook) are rotated by hookrelay;
        // a hand-made Secret carrying the annotation is its owner's to change (and the chart's
        // admission policy refuses the operator any write to it).
        let generated = secret
            .owner_references()
            .iter()
            .any(|o| o.kind == "Webhook" && o.api_version.starts_with("hookrelay.dev/"));
        let expires = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PREVIOUS_EXPIRES_ANNOTATION))
            .filter(|_| generated);
        self.expiry.observe(
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            &secret.name_any(),
            expires.map(String::as_str),
        );
    }

    /// A replica that just became the leader decides every Webhook's `Ready` again, against the
    /// status as the previous leader left it: only what differs is written, and an Event only
    /// for a flip that nobody recorded.
    async fn resync(&mut self) {
        let webhooks: Vec<Arc<Webhook>> = self.webhooks.values().cloned().collect();
        tracing::info!(
            webhooks = webhooks.len(),
            "leading: checking every Webhook's status"
        );
        for webhook in webhooks {
            let route = self.reconcile(&webhook).await;
            self.update_routes(|t| t.apply(route));
        }
    }

    /// The endpoint answered 410 Gone: not Ready, and no more deliveries, until the spec changes.
    async fn on_gone(&mut self, notice: GoneNotice) {
        let Some(webhook) = self.webhooks.get(&notice.webhook).cloned() else {
            return;
        };
        if webhook.metadata.generation != Some(notice.generation) {
            return;
        }
        self.gone
            .insert(notice.webhook.clone(), (notice.generation, notice.message));
        let route = self.reconcile(&webhook).await;
        self.update_routes(|t| t.apply(route));
    }

    /// Re-resolves the Webhooks `names` of `namespace`.
    async fn re_resolve(&mut self, namespace: &Arc<str>, names: Vec<Arc<str>>) {
        for name in names {
            let key = WebhookKey {
                namespace: namespace.clone(),
                name,
            };
            if let Some(webhook) = self.webhooks.get(&key).cloned() {
                let route = self.reconcile(&webhook).await;
                self.update_routes(|t| t.apply(route));
            }
        }
    }

    async fn on_webhook(
        &mut self,
        stream: usize,
        event: watcher::Event<DeserializeGuard<Webhook>>,
    ) {
        match event {
            watcher::Event::Init => {
                self.streams.relists[stream] = Some(Default::default());
                // Asked before the watcher lists (it lists when next polled): the list then
                // reflects at least this version, even when it is empty.
                self.streams.versions[stream] = self.current_version(stream).await.unwrap_or(0);
            }
            watcher::Event::InitApply(DeserializeGuard(Ok(webhook))) => {
                let webhook = Arc::new(webhook);
                self.remember(&webhook);
                let route = self.reconcile(&webhook).await;
                let version = &mut self.streams.versions[stream];
                *version = (*version).max(route.version);
                if let Some(relist) = &mut self.streams.relists[stream] {
                    relist.push(route.key);
                }
            }
            watcher::Event::InitDone => {
                let listed: Vec<Route> = self.streams.relists[stream]
                    .take()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|key| self.webhooks.get(key))
                    .map(|webhook| self.resolution(webhook).route)
                    .collect();
                let covered = self.streams.coverage[stream].clone();
                let version = std::mem::take(&mut self.streams.versions[stream]);
                let gone = self.update_routes(|t| {
                    let gone = t.reset(covered.as_deref(), listed);
                    t.observe(covered.as_deref(), version);
                    gone
                });
                for key in gone {
                    self.forget(&key).await;
                }
                if !std::mem::replace(&mut self.streams.synced[stream], true)
                    && self.streams.synced.iter().all(|s| *s)
                {
                    self.readiness.mark_ready("webhooks");
                    tracing::info!(
                        routes = self.routes.snapshot().len(),
                        "routing table synced"
                    );
                }
            }
            watcher::Event::Apply(DeserializeGuard(Ok(webhook))) => {
                let webhook = Arc::new(webhook);
                self.remember(&webhook);
                let route = self.reconcile(&webhook).await;
                let covered = self.streams.coverage[stream].clone();
                self.update_routes(|t| {
                    t.observe(covered.as_deref(), route.version);
                    t.apply(route);
                });
            }
            watcher::Event::Delete(DeserializeGuard(Ok(webhook))) => {
                let key = webhook_key(&webhook);
                let covered = self.streams.coverage[stream].clone();
                self.update_routes(|t| {
                    t.delete(&key);
                    t.observe(covered.as_deref(), resource_version(&webhook.metadata));
                });
                self.forget(&key).await;
                tracing::info!(webhook = %key, "deleted; route removed");
            }
            watcher::Event::InitApply(DeserializeGuard(Err(e)))
            | watcher::Event::Apply(DeserializeGuard(Err(e)))
            | watcher::Event::Delete(DeserializeGuard(Err(e))) => {
                // A Webhook the schema should have refused (written under an older CRD, say):
                // skip it rather than stall the watch, and stop routing to it.
                let key = WebhookKey::new(
                    e.metadata.namespace.as_deref().unwrap_or_default(),
                    e.metadata.name.as_deref().unwrap_or_default(),
                );
                tracing::warn!(webhook = %key, error = %e.error, "skipping a Webhook that cannot be read");
                let covered = self.streams.coverage[stream].clone();
                self.update_routes(|t| {
                    t.delete(&key);
                    t.observe(covered.as_deref(), resource_version(&e.metadata));
                });
                self.forget(&key).await;
            }
        }
    }

    /// The Webhooks' current `resourceVersion` in the scope of watch `stream` (a consistent
    /// read); None when the API server does not answer in time.
    async fn current_version(&self, stream: usize) -> Option<u64> {
        let client = self.upgrade.client.clone()?;
        let api: Api<Webhook> = match &self.streams.coverage[stream] {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        };
        let params = ListParams::default().limit(1);
        let list = api.list_metadata(&params);
        let list = tokio::time::timeout(Duration::from_secs(3), list)
            .await
            .ok()?
            .ok()?;
        list.metadata.resource_version?.parse().ok()
    }

    /// Changes the routing table and the metrics that count it.
    fn update_routes<R>(&self, change: impl FnOnce(&mut RoutingTable) -> R) -> R {
        let (result, counts) = self.routes.update(|t| {
            let result = change(t);
            (result, t.counts())
        });
        self.metrics.set_route_counts(counts.by_label());
        result
    }

    fn remember(&mut self, webhook: &Arc<Webhook>) {
        let key = webhook_key(webhook);
        if let Some(old) = self.webhooks.insert(key.clone(), webhook.clone()) {
            self.unindex(&key, &old);
        }
        self.refs.signing_secrets.index(
            &key.namespace,
            Some(&webhook.spec.secret_ref.name),
            &key.name,
        );
        let (headers_secret, service) = references(webhook);
        self.refs
            .headers_secrets
            .index(&key.namespace, headers_secret, &key.name);
        self.refs.services.index(&key.namespace, service, &key.name);
        let degraded = webhook.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True")
        });
        if degraded {
            self.degraded.insert(key);
        } else {
            self.degraded.remove(&key);
        }
        self.metrics
            .webhooks_degraded
            .set(self.degraded.len() as i64);
    }

    /// Drops what is kept for a Webhook that no longer exists, here and in the status writer.
    async fn forget(&mut self, key: &WebhookKey) {
        self.gone.remove(key);
        if self.degraded.remove(key) {
            self.metrics
                .webhooks_degraded
                .set(self.degraded.len() as i64);
        }
        if let Some(old) = self.webhooks.remove(key) {
            self.unindex(key, &old);
            if let Some(uid) = &old.metadata.uid {
                self.shared_warned.retain(|(warned, _)| warned != uid);
                self.upgrade
                    .warned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(uid);
                self.upgrade
                    .looked_up
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(uid);
            }
            self.status
                .send(Update::WebhookDeleted { key: key.clone() })
                .await;
        }
    }

    fn unindex(&mut self, key: &WebhookKey, webhook: &Webhook) {
        self.refs.signing_secrets.unindex(
            &key.namespace,
            Some(&webhook.spec.secret_ref.name),
            &key.name,
        );
        let (headers_secret, service) = references(webhook);
        self.refs
            .headers_secrets
            .unindex(&key.namespace, headers_secret, &key.name);
        self.refs
            .services
            .unindex(&key.namespace, service, &key.name);
    }

    /// resolve -> validate, against what the controller knows now. Pure.
    fn resolution(&self, webhook: &Webhook) -> Resolution {
        let key = webhook_key(webhook);
        let secret = self
            .refs
            .signing_secrets
            .get(&key.namespace, &webhook.spec.secret_ref.name);
        let gone = self
            .gone
            .get(&key)
            .filter(|(generation, _)| webhook.metadata.generation == Some(*generation))
            .map(|(_, message)| message.clone())
            .or_else(|| endpoint_gone(webhook));
        let (headers_secret, service) = references(webhook);
        let headers_secret =
            headers_secret.and_then(|name| self.refs.headers_secrets.get(&key.namespace, name));
        let refs = References {
            headers_secret: headers_secret.map(|s| &s.data),
            service: service.and_then(|name| self.refs.services.get(&key.namespace, name)),
            signing_binding: secret.map(|s| &s.binding),
            headers_binding: headers_secret.map(|s| &s.binding),
        };
        let secret = secret.map(|s| &s.data);
        resolve_with(webhook, secret, refs, &self.egress, gone.as_deref())
    }

    /// resolve -> validate -> (the caller updates routing) -> status.
    async fn reconcile(&mut self, webhook: &Webhook) -> Route {
        let key = webhook_key(webhook);
        let resolution = self.resolution(webhook);
        self.warn_after_upgrade(webhook, &resolution);
        self.warn_if_shared(webhook).await;
        if let Some(update) = ready_update(webhook, &resolution.ready, Timestamp::now()) {
            tracing::info!(
                webhook = %key,
                ready = resolution.ready.status,
                reason = %resolution.ready.reason,
                message = %resolution.ready.message,
                "Ready condition changed"
            );
            self.status
                .send(Update::WebhookReady {
                    key: key.clone(),
                    update: Box::new(update),
                })
                .await;
        }
        let listed = webhook.status.as_ref().map(|s| s.blocked_keys.as_slice());
        if let (Some(sequencer), Some(listed), Some(uid)) =
            (&self.sequencer, listed, &webhook.metadata.uid)
            && sequencer.is_stale(&key, listed)
        {
            self.status
                .send(Update::BlockedKeys {
                    key,
                    uid: uid.clone(),
                    keys: Vec::new(),
                })
                .await;
        }
        resolution.route
    }
}

impl WebhookController {
    /// One warning per Webhook and Secret when its signing or `headersFrom` Secret is bound to
    /// no Webhook (no `hookrelay.dev/webhooks` annotation, no owner) and other Webhooks use it
    /// too: such a Secret may be used by any Webhook of the namespace, so whoever can create
    /// one can sign with it, or send its headers to their own URL.
    async fn warn_if_shared(&mut self, webhook: &Webhook) {
        if !self.leadership.is_leader() {
            return;
        }
        let key = webhook_key(webhook);
        let uid = webhook.metadata.uid.clone().unwrap_or_default();
        let (headers_secret, _) = references(webhook);
        let used = [
            (
                "signing",
                Some(webhook.spec.secret_ref.name.as_str()),
                &self.refs.signing_secrets,
            ),
            ("headersFrom", headers_secret, &self.refs.headers_secrets),
        ];
        let mut notes = Vec::new();
        for (kind, name, refs) in used {
            let Some(name) = name else { continue };
            let Some(secret) = refs.get(&key.namespace, name) else {
                continue;
            };
            // Counted, and at most a few named: with thousands of Webhooks on one Secret, a
            // note listing them all for each of them grew with the square of their number.
            let (count, named) =
                refs.some_referrers(&(key.namespace.clone(), Arc::from(name)), SHARED_NAMED);
            if secret.binding.is_bound() || count < 2 {
                continue;
            }
            // The warning goes to the Webhooks it names: with thousands on one Secret, one
            // Event on each at every start of the operator would be thousands of writes to the
            // API server for one fact about the Secret.
            if !named.iter().any(|named| **named == *key.name) {
                continue;
            }
            if !self.shared_warned.insert((uid.clone(), Arc::from(name))) {
                continue;
            }
            let listed = named.join(",");
            let note = if count <= SHARED_NAMED {
                format!(
                    "the {kind} Secret {name} is used by Webhooks {listed} and bound to none: any Webhook of this namespace may use it; bind it with the annotation {WEBHOOKS_ANNOTATION}: {listed}"
                )
            } else {
                format!(
                    "the {kind} Secret {name} is used by {count} Webhooks ({listed} and {} more) and bound to none: any Webhook of this namespace may use it; bind it with the annotation {WEBHOOKS_ANNOTATION} listing the Webhooks that may",
                    count - named.len()
                )
            };
            notes.push(note);
        }
        for note in notes {
            tracing::warn!(webhook = %key, "{note}");
            self.status
                .send(Update::Note(crate::status::TransitionEvent {
                    warning: true,
                    reason: "SecretShared".into(),
                    note,
                    object: object_ref(webhook),
                }))
                .await;
        }
    }

    /// One warning per Webhook that stopped working because of the hardening of its signing
    /// Secret: one that exists without the opt-in label (found with a GET on a task, never in
    /// the loop; the condition itself does not say, so a Webhook's author cannot probe for
    /// Secrets), or one shorter than 16 bytes.
    fn warn_after_upgrade(&mut self, webhook: &Webhook, resolution: &Resolution) {
        let uid = webhook.metadata.uid.clone().unwrap_or_default();
        let reason = resolution.ready.reason.as_str();
        let warned = self.upgrade.warned.clone();
        if warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&uid)
        {
            return;
        }
        let key = webhook_key(webhook);
        let secret = webhook.spec.secret_ref.name.clone();
        if reason == ready_reason::SECRET_INVALID
            && resolution.ready.message.contains("at least 16")
        {
            warned.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
            tracing::warn!(
                webhook = %key,
                secret,
                "this Webhook's signing secret is shorter than 16 bytes and no longer signs: replace it with a strong one (see docs/operating.md, \"Upgrading to this version\")"
            );
        } else if reason == ready_reason::SECRET_NOT_FOUND
            && self.leadership.is_leader()
            && let Some(client) = self.upgrade.client.clone()
        {
            // Once per generation of the Webhook (a change of its spec, say a new secretRef,
            // looks again), again after a failed look-up; bounded by `lookups`.
            let generation = webhook.metadata.generation.unwrap_or_default();
            let looked_up = self.upgrade.looked_up.clone();
            let previous = looked_up
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid.clone(), generation);
            if previous == Some(generation) {
                return;
            }
            let lookups = self.upgrade.lookups.clone();
            tokio::spawn(async move {
                let Ok(_slot) = lookups.acquire_owned().await else {
                    return;
                };
                let api: kube::Api<Secret> = kube::Api::namespaced(client, &key.namespace);
                let found = match api.get_metadata_opt(&secret).await {
                    Ok(Some(found)) => found,
                    Ok(None) => return,
                    Err(_) => {
                        looked_up
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&uid);
                        return;
                    }
                };
                let labelled =
                    found.labels().get(SIGNING_SECRET_LABEL).map(String::as_str) == Some("true");
                if !labelled && warned.lock().unwrap_or_else(|e| e.into_inner()).insert(uid) {
                    tracing::warn!(
                        webhook = %key,
                        secret,
                        "this Webhook's Secret exists but lacks the label {SIGNING_SECRET_LABEL}=true, so it no longer signs: kubectl label secret -n {} {secret} {SIGNING_SECRET_LABEL}=true",
                        key.namespace
                    );
                }
            });
        }
    }
}

/// The `EndpointGone` verdict, while it still applies: the delivery engine set it for this
/// generation, and a spec change (a new URL, say) clears it.
fn endpoint_gone(webhook: &Webhook) -> Option<String> {
    let ready = webhook
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (ready.reason == ready_reason::ENDPOINT_GONE
        && ready.observed_generation == webhook.metadata.generation)
        .then(|| ready.message.clone())
}

/// The status update for a decided `Ready` condition, or None when the status already says so
/// (which is what keeps our own status writes from triggering more writes).
pub(crate) fn ready_update(
    webhook: &Webhook,
    ready: &crate::crd::ConditionState,
    now: Timestamp,
) -> Option<ReadyUpdate> {
    let status = webhook.status.clone().unwrap_or_default();
    let generation = webhook.metadata.generation.unwrap_or_default();
    let current = status.conditions.iter().find(|c| c.type_ == ready.type_);
    let unchanged = current.is_some_and(|c| {
        c.status == if ready.status { "True" } else { "False" }
            && c.reason == ready.reason
            && c.message == ready.message
            && c.observed_generation == Some(generation)
    }) && status.observed_generation == Some(generation);
    if unchanged {
        return None;
    }
    let first = current.is_none();
    let mut conditions: Vec<Condition> = status.conditions;
    let flipped = merge_condition(&mut conditions, ready, Some(generation), now);
    let condition = conditions.into_iter().find(|c| c.type_ == ready.type_)?;
    // A new Webhook that is Ready at once is no news: applying 10,000 of them would otherwise
    // write 10,000 Events beside their 10,000 status patches. A first verdict of not Ready is.
    let event = (flipped && !(first && ready.status)).then(|| TransitionEvent {
        warning: !ready.status,
        reason: ready.reason.clone(),
        note: ready.message.clone(),
        object: object_ref(webhook),
    });
    let suspended = (condition.reason == ready_reason::FAILING_TOO_LONG).then(|| Suspension {
        since: status
            .suspended
            .as_ref()
            .map_or(Time(now), |s| s.since.clone()),
        reason: condition.message.clone(),
    });
    Some(ReadyUpdate {
        generation,
        condition,
        event,
        suspended,
    })
}

fn object_ref(webhook: &Webhook) -> ObjectReference {
    ObjectReference {
        api_version: Some("hookrelay.dev/v1alpha1".into()),
        kind: Some("Webhook".into()),
        name: webhook.metadata.name.clone(),
        namespace: webhook.metadata.namespace.clone(),
        uid: webhook.metadata.uid.clone(),
        resource_version: webhook.metadata.resource_version.clone(),
        ..Default::default()
    }
}

fn webhook_key(webhook: &Webhook) -> WebhookKey {
    WebhookKey::new(
        webhook.namespace().as_deref().unwrap_or_default(),
        &webhook.name_any(),
    )
}

/// The names of the `headersFrom` Secret and the `serviceRef` Service a Webhook references.
fn references(webhook: &Webhook) -> (Option<&str>, Option<&str>) {
    (
        webhook
            .spec
            .headers_from
            .as_ref()
            .map(|h| h.secret_ref.name.as_str()),
        webhook.spec.service_ref.as_ref().map(|s| s.name.as_str()),
    )
}

fn secret_key(secret: &Secret) -> NamespacedName {
    (
        Arc::from(secret.namespace().unwrap_or_default().as_str()),
        Arc::from(secret.name_any().as_str()),
    )
}

/// Keeps only what resolution needs of a Secret: its name, data, owners and the Webhooks it is
/// bound to, and when a rotation's `previous` key expires.
fn strip_secret(guard: &mut DeserializeGuard<Secret>) {
    if let Ok(secret) = &mut guard.0 {
        secret.metadata.managed_fields = None;
        secret.metadata.annotations = secret.metadata.annotations.take().map(|mut a| {
            a.retain(|k, _| k == PREVIOUS_EXPIRES_ANNOTATION || k == WEBHOOKS_ANNOTATION);
            a
        });
        secret.metadata.labels = None;
        secret.string_data = None;
    }
}

/// Keeps only what resolution needs of a Service: its spec.
fn strip_service(guard: &mut DeserializeGuard<Service>) {
    if let Ok(service) = &mut guard.0 {
        service.metadata.managed_fields = None;
        service.metadata.annotations = None;
        service.metadata.labels = None;
        service.status = None;
    }
}

/// Keeps what the controller reads of a Webhook: metadata without managedFields, the spec,
/// and the conditions (not the delivery history).
fn strip_webhook(guard: &mut DeserializeGuard<Webhook>) {
    if let Ok(webhook) = &mut guard.0 {
        webhook.metadata.managed_fields = None;
        webhook.metadata.annotations = None;
        if let Some(status) = &mut webhook.status {
            status.recent_deliveries = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ConditionState;

    fn webhook(ready: Option<&str>) -> Webhook {
        let mut w: Webhook = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookrelay.dev/v1alpha1",
            "kind": "Webhook",
            "metadata": {"name": "w", "namespace": "docs", "uid": "u1", "generation": 2},
            "spec": {"url": "https://example.com/h", "events": ["*"], "secretRef": {"name": "s"}}
        }))
        .unwrap();
        if let Some(status) = ready {
            w.status = serde_json::from_value(serde_json::json!({
                "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": status, "reason": "Before",
                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
            }))
            .unwrap();
        }
        w
    }

    fn event_of(w: &Webhook, ready: bool) -> Option<(bool, String)> {
        let state = ConditionState::new(
            "Ready",
            ready,
            if ready { "Routed" } else { "SecretNotFound" },
            "m",
        );
        let update = ready_update(w, &state, Timestamp::now()).expect("a status update");
        update.event.map(|e| (e.warning, e.reason))
    }

    fn service(ns: &str, name: &str, port: i32) -> DeserializeGuard<Service> {
        DeserializeGuard(Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "10.0.0.9", "ports": [{"name": "http", "port": port}]}
        }))
        .unwrap()))
    }

    #[test]
    fn referenced_objects_report_changes_and_a_relist_drops_what_it_did_not_see() {
        let mut services: Referenced<ServiceInfo> = Referenced::new(1);
        let docs: Arc<str> = "docs".into();
        let key = |name: &str| (docs.clone(), Arc::<str>::from(name));
        let info = ServiceInfo::from_service;
        assert!(!services.all_synced());
        assert!(
            services
                .on_event(0, None, watcher::Event::Init, info)
                .is_empty()
        );
        let listed = watcher::Event::InitApply(service("docs", "a", 80));
        assert!(services.on_event(0, None, listed, info).is_empty());
        let listed = watcher::Event::InitApply(service("docs", "b", 80));
        assert!(services.on_event(0, None, listed, info).is_empty());
        let mut changed = services.on_event(0, None, watcher::Event::InitDone, info);
        changed.sort();
        assert_eq!(changed, [key("a"), key("b")]);
        assert!(services.all_synced());
        // The same object again is no change; a new port is.
        let same = watcher::Event::Apply(service("docs", "a", 80));
        assert!(services.on_event(0, None, same, info).is_empty());
        let moved = watcher::Event::Apply(service("docs", "a", 81));
        assert_eq!(services.on_event(0, None, moved, info), [key("a")]);
        assert_eq!(
            services.get(&docs, "a").unwrap().ports,
            [(Some("http".into()), 81)]
        );
        // A re-list without b (deleted while the watch was down) drops it.
        services.on_event(0, None, watcher::Event::Init, info);
        let listed = watcher::Event::InitApply(service("docs", "a", 81));
        services.on_event(0, None, listed, info);
        let changed = services.on_event(0, None, watcher::Event::InitDone, info);
        assert_eq!(changed, [key("b")]);
        assert!(services.get(&docs, "b").is_none());
        // Referrers follow index / unindex.
        let w: Arc<str> = "w".into();
        services.index(&docs, Some("a"), &w);
        assert_eq!(services.referrers(&key("a")), std::slice::from_ref(&w));
        services.unindex(&docs, Some("a"), &w);
        assert!(services.referrers(&key("a")).is_empty());
    }

    #[test]
    fn a_new_webhook_ready_at_once_records_no_event_but_every_other_flip_does() {
        assert_eq!(event_of(&webhook(None), true), None);
        assert_eq!(
            event_of(&webhook(None), false),
            Some((true, "SecretNotFound".into()))
        );
        assert_eq!(
            event_of(&webhook(Some("False")), true),
            Some((false, "Routed".into()))
        );
        assert_eq!(
            event_of(&webhook(Some("True")), false),
            Some((true, "SecretNotFound".into()))
        );
        // The same verdict for a new generation is a status update without an Event.
        assert_eq!(event_of(&webhook(Some("True")), true), None);
    }
}
