//! The routing table: which Webhooks receive an event of a type in a namespace.
//!
//! [`RoutingTable`] is a plain state machine (`apply` / `delete` / `reset` / `lookup`), written by
//! one task (the Webhook controller) and read by many (the delivery paths). It is built from
//! persistent maps, so a copy costs O(1) and a change O(log n): [`Routes`] publishes a new
//! snapshot on every change and readers load the current one without locking.

use std::{collections::HashSet, sync::Arc};

use arc_swap::ArcSwap;
use imbl::{HashMap, OrdMap};
use tokio_util::sync::CancellationToken;

use crate::{
    crd::{DeliveryPolicy, EventType, Ordering, WebhookEvent},
    health::ViewHealth,
    keys::WebhookKey,
    metrics::Metrics,
    wire::{CustomHeaders, ServiceTarget, Signer},
};

mod filter;
mod screen;
pub use filter::{EventFacts, EventFilter, MAX_FILTER_LENGTH};
pub use screen::{FilterBudget, FilterFailure, FilterInput, FilterReport, Screen};

/// Where deliveries to a Webhook stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteState {
    /// Deliveries are sent.
    Active,
    /// `spec.paused`: deliveries are held until unpaused.
    Paused,
    /// The Webhook cannot be delivered to until its cause is fixed; deliveries wait and retry.
    Blocked {
        reason: &'static str,
        message: String,
    },
}

impl RouteState {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RouteState::Active => "Active",
            RouteState::Paused => "Paused",
            RouteState::Blocked { .. } => "Blocked",
        }
    }

    fn index(&self) -> usize {
        match self {
            RouteState::Active => 0,
            RouteState::Paused => 1,
            RouteState::Blocked { .. } => 2,
        }
    }
}

/// Number of routes in each state, kept as the table changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub active: usize,
    pub paused: usize,
    pub blocked: usize,
}

impl StateCounts {
    /// The counts by the state's label (`RouteState::label`).
    pub fn by_label(&self) -> [(&'static str, usize); 3] {
        [
            ("Active", self.active),
            ("Paused", self.paused),
            ("Blocked", self.blocked),
        ]
    }
}

/// Everything the delivery path needs to deliver to one Webhook.
#[derive(Clone, Debug)]
pub struct Route {
    pub key: WebhookKey,
    pub uid: String,
    pub generation: i64,
    /// The Webhook's `resourceVersion` this route was built from. Work routed on another
    /// replica carries it, so that a replica whose table has not seen that version yet waits
    /// rather than judging the Webhook gone (see [`RoutingTable::seen`]).
    pub version: u64,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    /// Absent when the signing secret could not be resolved.
    pub signer: Option<Arc<Signer>>,
    pub delivery: DeliveryPolicy,
    pub state: RouteState,
    /// `spec.serviceRef` resolved: `url` is then derived from it.
    pub service: Option<Arc<ServiceTarget>>,
    /// `spec.headers` and `spec.headersFrom`, checked.
    pub headers: CustomHeaders,
    /// `spec.filter`, compiled once per spec; None delivers every event of the listed types.
    pub filter: Option<Arc<EventFilter>>,
    /// `spec.ordering`: deliveries of one key go one at a time.
    pub ordering: Option<Ordering>,
    /// Cancelled once this route is replaced or removed and the new table is published: what
    /// waits on a Webhook (a held delivery) wakes exactly when that Webhook changes.
    pub superseded: CancellationToken,
}

impl Route {
    /// An active route of `namespace`/`name` for every event type to `url`, uid
    /// `uid-<namespace>-<name>`, no signer (tests set what they need on top).
    #[cfg(any(test, feature = "test-seams"))]
    pub fn for_tests(namespace: &str, name: &str, url: &str) -> Route {
        Route {
            key: WebhookKey::new(namespace, name),
            uid: format!("uid-{namespace}-{name}"),
            generation: 1,
            version: 0,
            url: url.to_owned(),
            events: vec![WebhookEvent::All],
            signer: None,
            delivery: DeliveryPolicy::default(),
            state: RouteState::Active,
            service: None,
            headers: Default::default(),
            filter: None,
            ordering: None,
            superseded: Default::default(),
        }
    }

    fn event_types(&self) -> impl Iterator<Item = EventType> + '_ {
        let mut seen = [false; EventType::ALL.len()];
        self.events
            .iter()
            .flat_map(|e| e.types().iter().copied())
            .filter(move |t| !std::mem::replace(&mut seen[*t as usize], true))
    }
}

/// Routes of one namespace, indexed by event type.
#[derive(Clone, Default, Debug)]
struct NamespaceRoutes {
    by_type: [OrdMap<Arc<str>, Arc<Route>>; EventType::ALL.len()],
}

/// Namespace + event type -> target routes.
#[derive(Clone, Default, Debug)]
pub struct RoutingTable {
    routes: HashMap<WebhookKey, Arc<Route>>,
    namespaces: HashMap<Arc<str>, NamespaceRoutes>,
    by_state: [usize; 3],
    /// How far the Webhook watch of each scope (a namespace, or None: all of them) has come: the
    /// table reflects every change up to this `resourceVersion`.
    seen: HashMap<Option<Arc<str>>, u64>,
    /// Routes replaced or removed by the change in progress; [`Routes::update`] signals them
    /// once the new table is visible.
    retired: Vec<Arc<Route>>,
}

impl RoutingTable {
    /// Adds or replaces the route of `route.key`.
    pub fn apply(&mut self, route: Route) {
        self.delete(&route.key);
        let route = Arc::new(route);
        let ns = self
            .namespaces
            .entry(route.key.namespace.clone())
            .or_default();
        for t in route.event_types() {
            ns.by_type[t as usize].insert(route.key.name.clone(), route.clone());
        }
        self.by_state[route.state.index()] += 1;
        self.routes.insert(route.key.clone(), route);
    }

    /// Removes the route of `key`, returning it.
    pub fn delete(&mut self, key: &WebhookKey) -> Option<Arc<Route>> {
        let old = self.routes.remove(key)?;
        self.retired.push(old.clone());
        self.by_state[old.state.index()] -= 1;
        if let Some(ns) = self.namespaces.get_mut(&key.namespace) {
            for t in old.event_types() {
                ns.by_type[t as usize].remove(&key.name);
            }
            if ns.by_type.iter().all(OrdMap::is_empty) {
                self.namespaces.remove(&key.namespace);
            }
        }
        Some(old)
    }

    /// After a re-list of `namespace` (None: of every namespace): applies `routes` and removes
    /// every route of that scope not among them, returning the keys removed.
    pub fn reset(&mut self, namespace: Option<&str>, routes: Vec<Route>) -> Vec<WebhookKey> {
        let keep: HashSet<WebhookKey> = routes.iter().map(|r| r.key.clone()).collect();
        let gone: Vec<WebhookKey> = self
            .routes
            .keys()
            .filter(|k| namespace.is_none_or(|ns| *k.namespace == *ns) && !keep.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.delete(key);
        }
        for route in routes {
            self.apply(route);
        }
        gone
    }

    /// The routes that receive an event of type `event` in `namespace`, ordered by name.
    /// O(matches).
    pub fn lookup<'a>(
        &'a self,
        namespace: &str,
        event: EventType,
    ) -> impl Iterator<Item = &'a Arc<Route>> + 'a {
        self.namespaces
            .get(namespace)
            .into_iter()
            .flat_map(move |ns| ns.by_type[event as usize].values())
    }

    /// Records that the Webhook watch of `scope` (a namespace, or None: all) has brought every
    /// change up to `version`; it never goes back.
    pub fn observe(&mut self, scope: Option<&str>, version: u64) {
        let seen = self.seen.entry(scope.map(Arc::from)).or_default();
        *seen = (*seen).max(version);
    }

    /// The `resourceVersion` up to which this table reflects the Webhooks of `namespace`: a
    /// Webhook routed elsewhere at a version above it may exist here unseen, one at or below it
    /// that is not in the table has been deleted.
    pub fn seen(&self, namespace: &str) -> u64 {
        let all = self.seen.get(&None).copied().unwrap_or(0);
        let own = self
            .seen
            .get(&Some(Arc::from(namespace)))
            .copied()
            .unwrap_or(0);
        all.max(own)
    }

    /// What the table says of the Webhook `key` with uid `uid`, routed elsewhere from a table
    /// that had seen `version` of it (0: routed from this table, nothing to wait for).
    pub fn find(&self, key: &WebhookKey, uid: &str, version: u64) -> Found<'_> {
        let behind = version > self.seen(&key.namespace);
        match self.routes.get(key) {
            Some(route) if route.uid == uid && !behind => Found::Route(route),
            _ if behind => Found::NotSeenYet {
                seen: self.seen(&key.namespace),
            },
            Some(_) => Found::Replaced,
            None => Found::Deleted,
        }
    }

    /// Whether any Webhook of `namespace` is routed.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    pub fn get(&self, key: &WebhookKey) -> Option<&Arc<Route>> {
        self.routes.get(key)
    }

    /// Routes by state, O(1).
    pub fn counts(&self) -> StateCounts {
        let [active, paused, blocked] = self.by_state;
        StateCounts {
            active,
            paused,
            blocked,
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// What a routing table knows of a Webhook that work names (see [`RoutingTable::find`]).
#[derive(Debug)]
pub enum Found<'a> {
    /// This one, seen at least at the version the work names.
    Route(&'a Arc<Route>),
    /// The table has not seen the version the work names (it lags, or this replica is cut off
    /// from the API server): nothing can be said yet.
    NotSeenYet { seen: u64 },
    /// Deleted, as of a version at or after the one the work names.
    Deleted,
    /// Deleted and created again: the namesake is another Webhook.
    Replaced,
}

/// The published routing table: one writer, any number of lock-free readers; and the screen
/// its filters are evaluated through.
#[derive(Clone, Default)]
pub struct Routes {
    current: Arc<ArcSwap<RoutingTable>>,
    view: ViewHealth,
    screen: Arc<Screen>,
}

impl Routes {
    /// Routes whose filters evaluate within `budget`.
    pub fn with_filter_budget(budget: FilterBudget) -> Self {
        Self {
            screen: Arc::new(Screen::new(budget)),
            ..Self::default()
        }
    }

    /// Where filters are evaluated (see [`Screen`]).
    pub fn screen(&self) -> &Screen {
        &self.screen
    }

    /// The routes that receive `input`, an event of type `event` in `namespace`, as the current
    /// table and each route's filter say. The delivery paths of every ingest mode route here.
    pub async fn targets<I: FilterInput>(
        &self,
        namespace: &str,
        event: EventType,
        input: Arc<I>,
        metrics: &Metrics,
    ) -> Vec<Arc<Route>> {
        let table = self.snapshot();
        self.screen
            .targets(&table, namespace, event, input, metrics)
            .await
    }

    /// Whether this view can be trusted now (see [`ViewHealth`]).
    pub fn view(&self) -> &ViewHealth {
        &self.view
    }

    /// The current table; later changes do not affect the returned snapshot.
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Applies `change` to a copy of the table, publishes it, then tells the routes it replaced
    /// or removed (after publishing, so that whoever wakes reads the new table).
    pub fn update<R>(&self, change: impl FnOnce(&mut RoutingTable) -> R) -> R {
        let mut table = RoutingTable::clone(&self.current.load());
        let result = change(&mut table);
        let retired = std::mem::take(&mut table.retired);
        self.current.store(Arc::new(table));
        for route in retired {
            route.superseded.cancel();
        }
        result
    }
}

#[cfg(test)]
mod tests;
