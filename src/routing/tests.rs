use std::time::{Duration, Instant};

use super::*;

fn route(ns: &str, name: &str, events: &[WebhookEvent]) -> Route {
    Route {
        uid: format!("uid-{name}"),
        events: events.to_vec(),
        ..Route::for_tests(ns, name, &format!("https://example.com/{name}"))
    }
}

fn names(table: &RoutingTable, ns: &str, t: EventType) -> Vec<String> {
    table
        .lookup(ns, t)
        .map(|r| r.key.name.to_string())
        .collect()
}

#[test]
fn lookup_matches_namespace_and_type() {
    let mut t = RoutingTable::default();
    t.apply(route(
        "docs",
        "a",
        &[WebhookEvent::Completed, WebhookEvent::Error],
    ));
    t.apply(route("docs", "b", &[WebhookEvent::Uploaded]));
    t.apply(route("other", "c", &[WebhookEvent::Completed]));
    assert_eq!(names(&t, "docs", EventType::Completed), ["a"]);
    assert_eq!(names(&t, "docs", EventType::Error), ["a"]);
    assert_eq!(names(&t, "docs", EventType::Uploaded), ["b"]);
    assert!(names(&t, "docs", EventType::Deleted).is_empty());
    assert_eq!(names(&t, "other", EventType::Completed), ["c"]);
    assert!(names(&t, "nowhere", EventType::Completed).is_empty());
}

#[test]
fn star_matches_every_type_once() {
    let mut t = RoutingTable::default();
    t.apply(route(
        "docs",
        "all",
        &[WebhookEvent::All, WebhookEvent::Error],
    ));
    for ty in EventType::ALL {
        assert_eq!(names(&t, "docs", ty), ["all"], "{ty}");
    }
}

#[test]
fn apply_replaces_the_previous_route_of_the_same_webhook() {
    let mut t = RoutingTable::default();
    t.apply(route("docs", "a", &[WebhookEvent::Completed]));
    let mut changed = route("docs", "a", &[WebhookEvent::Error]);
    changed.url = "https://example.com/new".into();
    t.apply(changed);
    assert!(names(&t, "docs", EventType::Completed).is_empty());
    let found: Vec<_> = t.lookup("docs", EventType::Error).collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].url, "https://example.com/new");
    assert_eq!(t.len(), 1);
}

#[test]
fn delete_removes_every_index_entry() {
    let mut t = RoutingTable::default();
    t.apply(route("docs", "a", &[WebhookEvent::All]));
    t.apply(route("docs", "b", &[WebhookEvent::Completed]));
    assert!(t.delete(&WebhookKey::new("docs", "a")).is_some());
    assert!(t.delete(&WebhookKey::new("docs", "a")).is_none());
    assert_eq!(names(&t, "docs", EventType::Completed), ["b"]);
    assert!(names(&t, "docs", EventType::Error).is_empty());
    t.delete(&WebhookKey::new("docs", "b"));
    assert!(t.is_empty());
    assert!(t.namespaces.is_empty(), "empty namespaces are dropped");
}

/// kubert's `namespaced_restart`: after a watch restart, webhooks not listed again are gone,
/// those listed again are kept and updated, new ones are added.
#[test]
fn reset_after_relist_removes_webhooks_not_seen_again() {
    let mut t = RoutingTable::default();
    t.apply(route("docs", "kept", &[WebhookEvent::Completed]));
    t.apply(route(
        "docs",
        "deleted-while-disconnected",
        &[WebhookEvent::Completed],
    ));
    t.apply(route("other", "also-gone", &[WebhookEvent::Error]));

    let mut kept = route("docs", "kept", &[WebhookEvent::Error]);
    kept.generation = 2;
    let gone = t.reset(
        None,
        vec![kept, route("docs", "new", &[WebhookEvent::Completed])],
    );

    let mut gone: Vec<_> = gone.iter().map(ToString::to_string).collect();
    gone.sort();
    assert_eq!(gone, ["docs/deleted-while-disconnected", "other/also-gone"]);
    assert_eq!(names(&t, "docs", EventType::Completed), ["new"]);
    assert_eq!(names(&t, "docs", EventType::Error), ["kept"]);
    assert_eq!(
        t.get(&WebhookKey::new("docs", "kept")).unwrap().generation,
        2
    );
    assert!(names(&t, "other", EventType::Error).is_empty());
    assert_eq!(t.len(), 2);
}

#[test]
fn snapshots_do_not_see_later_changes() {
    let routes = Routes::default();
    routes.update(|t| t.apply(route("docs", "a", &[WebhookEvent::Completed])));
    let before = routes.snapshot();
    routes.update(|t| t.delete(&WebhookKey::new("docs", "a")));
    assert_eq!(names(&before, "docs", EventType::Completed), ["a"]);
    assert!(names(&routes.snapshot(), "docs", EventType::Completed).is_empty());
}

#[test]
fn lookup_is_ordered_by_name_within_a_namespace() {
    let mut t = RoutingTable::default();
    for name in ["c", "a", "b"] {
        t.apply(route("docs", name, &[WebhookEvent::Deleted]));
    }
    assert_eq!(names(&t, "docs", EventType::Deleted), ["a", "b", "c"]);
}

/// With one watch per namespace, a re-list of one namespace leaves the others alone.
#[test]
fn reset_of_one_namespace_keeps_the_others() {
    let mut t = RoutingTable::default();
    t.apply(route("a", "x", &[WebhookEvent::Completed]));
    t.apply(route("b", "y", &[WebhookEvent::Completed]));
    let gone = t.reset(Some("a"), vec![]);
    assert_eq!(gone, [WebhookKey::new("a", "x")]);
    assert_eq!(names(&t, "b", EventType::Completed), ["y"]);
}

#[test]
fn counts_follow_apply_and_delete() {
    let mut t = RoutingTable::default();
    t.apply(route("docs", "a", &[WebhookEvent::All]));
    let mut paused = route("docs", "b", &[WebhookEvent::All]);
    paused.state = RouteState::Paused;
    t.apply(paused);
    assert_eq!(
        t.counts(),
        StateCounts {
            active: 1,
            paused: 1,
            blocked: 0
        }
    );
    let mut blocked = route("docs", "a", &[WebhookEvent::All]);
    blocked.state = RouteState::Blocked {
        reason: "SecretNotFound",
        message: String::new(),
    };
    t.apply(blocked);
    assert_eq!(
        t.counts(),
        StateCounts {
            active: 0,
            paused: 1,
            blocked: 1
        }
    );
    t.delete(&WebhookKey::new("docs", "b"));
    assert_eq!(
        t.counts(),
        StateCounts {
            active: 0,
            paused: 0,
            blocked: 1
        }
    );
}

#[test]
fn replaced_and_removed_routes_are_signalled_after_the_new_table_is_published() {
    let routes = Routes::default();
    routes.update(|t| {
        t.apply(route("docs", "a", &[WebhookEvent::Completed]));
        t.apply(route("docs", "b", &[WebhookEvent::Completed]));
    });
    let a = routes
        .snapshot()
        .get(&WebhookKey::new("docs", "a"))
        .cloned()
        .unwrap();
    let b = routes
        .snapshot()
        .get(&WebhookKey::new("docs", "b"))
        .cloned()
        .unwrap();
    assert!(!a.superseded.is_cancelled() && !b.superseded.is_cancelled());

    let mut paused = route("docs", "a", &[WebhookEvent::Completed]);
    paused.state = RouteState::Paused;
    routes.update(|t| t.apply(paused));
    assert!(a.superseded.is_cancelled(), "a replaced route is signalled");
    // Whoever wakes on the signal reads the table that replaced the route.
    let now = routes.snapshot();
    assert_eq!(
        now.get(&WebhookKey::new("docs", "a"))
            .map(|r| r.state.clone()),
        Some(RouteState::Paused)
    );
    assert!(
        !b.superseded.is_cancelled(),
        "only the changed Webhook is woken"
    );

    routes.update(|t| t.delete(&WebhookKey::new("docs", "b")));
    assert!(
        b.superseded.is_cancelled(),
        "a deleted route is signalled too"
    );
    let a2 = routes
        .snapshot()
        .get(&WebhookKey::new("docs", "a"))
        .cloned()
        .unwrap();
    routes.update(|t| t.reset(Some("docs"), vec![]));
    assert!(
        a2.superseded.is_cancelled(),
        "a re-list that drops a route signals it"
    );
}

/// An event's data, as its filters see it.
struct Data(serde_json::Map<String, serde_json::Value>);

impl FilterInput for Data {
    fn facts(&self) -> EventFacts<'_> {
        EventFacts::new(EventType::Completed, "2023-06-15T10:35:00Z", &self.0)
    }
}

fn data(value: serde_json::Value) -> Arc<Data> {
    Arc::new(Data(value.as_object().cloned().unwrap()))
}

fn filtered(ns: &str, name: &str, filter: &str) -> Route {
    let mut route = route(ns, name, &[WebhookEvent::All]);
    route.filter = Some(EventFilter::compile(filter).unwrap());
    route
}

fn count(metrics: &Metrics, result: &'static str) -> u64 {
    metrics
        .filter_evaluations
        .get_or_create(&crate::metrics::FilterLabels { result })
        .get()
}

async fn target_names(
    screen: &Screen,
    table: &RoutingTable,
    ns: &str,
    input: Arc<Data>,
    metrics: &Metrics,
) -> Vec<String> {
    screen
        .targets(table, ns, EventType::Completed, input, metrics)
        .await
        .iter()
        .map(|r| r.key.name.to_string())
        .collect()
}

#[tokio::test]
async fn each_routes_filter_decides_and_the_results_are_counted() {
    let metrics = Metrics::default();
    let screen = Screen::default();
    let mut t = RoutingTable::default();
    let mut broken = route("docs", "broken", &[WebhookEvent::All]);
    broken.state = RouteState::Blocked {
        reason: crate::crd::ready_reason::FILTER_INVALID,
        message: "spec.filter: ...".into(),
    };
    t.apply(filtered("docs", "folder-1", "data.folder_id == 1"));
    t.apply(broken);
    t.apply(route("docs", "all", &[WebhookEvent::All]));
    let targets = |value| target_names(&screen, &t, "docs", data(value), &metrics);
    assert_eq!(
        targets(serde_json::json!({"folder_id": 1})).await,
        ["all", "folder-1"]
    );
    assert_eq!(targets(serde_json::json!({"folder_id": 2})).await, ["all"]);
    // A missing field is an evaluation error: not delivered, and counted.
    assert_eq!(targets(serde_json::json!({})).await, ["all"]);
    assert_eq!(
        (
            count(&metrics, "matched"),
            count(&metrics, "not_matched"),
            count(&metrics, "error")
        ),
        (1, 1, 1)
    );
    // Without a filter to evaluate, the targets are known without a thread.
    let mut plain = RoutingTable::default();
    plain.apply(route("docs", "all", &[WebhookEvent::All]));
    assert!(Screen::without_evaluation(&plain, "docs", EventType::Completed).is_some());
    assert!(Screen::without_evaluation(&t, "docs", EventType::Completed).is_none());
}

/// A large event for a linear filter: long enough to evaluate that a budget of a millisecond
/// runs out.
fn large_event() -> Arc<Data> {
    let numbers: Vec<u64> = (0..200_000).collect();
    data(serde_json::json!({"a": numbers}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_its_filter_budget_fails_on_that_webhook_and_is_reported() {
    let metrics = Metrics::default();
    let screen = Screen::new(FilterBudget {
        per_event: Duration::from_millis(1),
        per_namespace: Duration::from_secs(10),
    });
    let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = reports.clone();
    screen.report_to(move |r| seen.lock().unwrap().push(r));
    let mut t = RoutingTable::default();
    t.apply(filtered("docs", "slow", "data.a.all(x, x >= 0)"));
    t.apply(route("docs", "plain", &[WebhookEvent::All]));
    let started = Instant::now();
    let names = target_names(&screen, &t, "docs", large_event(), &metrics).await;
    assert_eq!(
        names,
        ["plain"],
        "the filtered route fails, the other is delivered"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the caller does not wait for the filter: {:?}",
        started.elapsed()
    );
    assert_eq!(count(&metrics, "timeout"), 1);
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].webhook, WebhookKey::new("docs", "slow"));
    assert!(
        reports[0].message.contains("within 1 ms"),
        "{}",
        reports[0].message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_spent_its_filter_time_fails_its_filters_while_others_evaluate() {
    let metrics = Metrics::default();
    let screen = Screen::new(FilterBudget {
        per_event: Duration::from_secs(30),
        per_namespace: Duration::from_micros(1),
    });
    let mut t = RoutingTable::default();
    t.apply(filtered("greedy", "w", "data.a.all(x, x >= 0)"));
    t.apply(filtered("other", "w", "data.ok == true"));
    // The first evaluation runs (the bucket starts full) and overdraws it.
    let first = target_names(&screen, &t, "greedy", large_event(), &metrics).await;
    assert_eq!(first, ["w"]);
    let second = target_names(&screen, &t, "greedy", large_event(), &metrics).await;
    assert!(second.is_empty(), "over budget: {second:?}");
    assert_eq!(count(&metrics, "over_budget"), 1);
    let small = data(serde_json::json!({"ok": true}));
    assert_eq!(
        target_names(&screen, &t, "other", small, &metrics).await,
        ["w"],
        "another namespace has its own budget"
    );
}

/// Any sequence of changes leaves the table answering lookups as a plain map of routes would.
mod proptests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const NAMESPACES: [&str; 3] = ["docs", "billing", "ops"];
    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    #[derive(Clone, Debug)]
    enum Change {
        Apply(&'static str, &'static str, Vec<WebhookEvent>),
        Delete(&'static str, &'static str),
        /// A re-list of one namespace (or of all): its routes as (namespace, name, events).
        Reset(
            Option<&'static str>,
            Vec<(&'static str, &'static str, Vec<WebhookEvent>)>,
        ),
    }

    fn events() -> impl Strategy<Value = Vec<WebhookEvent>> {
        prop::collection::vec(
            prop::sample::select(vec![
                WebhookEvent::All,
                WebhookEvent::Uploaded,
                WebhookEvent::Processing,
                WebhookEvent::Completed,
                WebhookEvent::Error,
                WebhookEvent::Deleted,
            ]),
            1..=3,
        )
    }

    fn change() -> impl Strategy<Value = Change> {
        let ns = prop::sample::select(NAMESPACES.to_vec());
        let name = prop::sample::select(NAMES.to_vec());
        prop_oneof![
            4 => (ns.clone(), name.clone(), events()).prop_map(|(n, w, e)| Change::Apply(n, w, e)),
            2 => (ns.clone(), name.clone()).prop_map(|(n, w)| Change::Delete(n, w)),
            1 => (proptest::option::of(ns.clone()), prop::collection::vec((ns, name, events()), 0..5))
                .prop_map(|(scope, routes)| {
                    // A namespace's re-list holds only that namespace's Webhooks.
                    let routes = routes
                        .into_iter()
                        .map(|(n, w, e)| (scope.unwrap_or(n), w, e))
                        .collect();
                    Change::Reset(scope, routes)
                }),
        ]
    }

    type Model = BTreeMap<(&'static str, &'static str), Vec<WebhookEvent>>;

    fn model_lookup(model: &Model, ns: &str, t: EventType) -> Vec<String> {
        model
            .iter()
            .filter(|((n, _), events)| *n == ns && events.iter().any(|e| e.types().contains(&t)))
            .map(|((_, w), _)| w.to_string())
            .collect()
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        #[test]
        fn any_sequence_of_changes_looks_up_like_a_map_of_routes(
            changes in prop::collection::vec(change(), 0..40),
        ) {
            let mut table = RoutingTable::default();
            let mut model = Model::new();
            for change in changes {
                match change {
                    Change::Apply(ns, name, events) => {
                        table.apply(route(ns, name, &events));
                        model.insert((ns, name), events);
                    }
                    Change::Delete(ns, name) => {
                        let removed = table.delete(&WebhookKey::new(ns, name));
                        prop_assert_eq!(removed.is_some(), model.remove(&(ns, name)).is_some());
                    }
                    Change::Reset(scope, routes) => {
                        let mut gone: Vec<String> = table
                            .reset(scope, routes.iter().map(|(n, w, e)| route(n, w, e)).collect())
                            .iter()
                            .map(ToString::to_string)
                            .collect();
                        gone.sort();
                        let keep: Vec<_> = routes.iter().map(|(n, w, _)| (*n, *w)).collect();
                        let mut model_gone: Vec<String> = model
                            .keys()
                            .filter(|(n, w)| scope.is_none_or(|s| s == *n) && !keep.contains(&(*n, *w)))
                            .map(|(n, w)| WebhookKey::new(n, w).to_string())
                            .collect();
                        model_gone.sort();
                        prop_assert_eq!(gone, model_gone);
                        model.retain(|(n, w), _| scope.is_some_and(|s| s != *n) || keep.contains(&(*n, *w)));
                        for (n, w, e) in routes {
                            model.insert((n, w), e);
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                for ns in NAMESPACES {
                    prop_assert_eq!(table.has_namespace(ns), model.keys().any(|(n, _)| *n == ns));
                    for t in EventType::ALL {
                        prop_assert_eq!(names(&table, ns, t), model_lookup(&model, ns, t), "{} {:?}", ns, t);
                    }
                }
                for ((ns, name), events) in &model {
                    let got = table.get(&WebhookKey::new(ns, name));
                    prop_assert_eq!(got.map(|r| &r.events), Some(events));
                }
            }
        }
    }
}

/// Work routed on another replica names the Webhook's uid and the version its router had: a
/// table that has not seen that version says so instead of judging the Webhook gone.
#[test]
fn a_table_judges_a_webhook_gone_only_from_a_version_it_has_seen() {
    let key = WebhookKey::new("docs", "late");
    let mut t = RoutingTable::default();
    t.observe(None, 100);
    // Created at 120 elsewhere, unseen here: not "deleted".
    assert!(matches!(
        t.find(&key, "uid-late", 120),
        Found::NotSeenYet { seen: 100 }
    ));
    // The watch brings it.
    let mut late = route("docs", "late", &[WebhookEvent::All]);
    late.version = 120;
    t.observe(None, 120);
    t.apply(late.clone());
    assert!(matches!(t.find(&key, "uid-late", 120), Found::Route(_)));
    // Routed from a newer version (a change not seen here yet): wait for it too.
    assert!(matches!(
        t.find(&key, "uid-late", 130),
        Found::NotSeenYet { seen: 120 }
    ));
    // Deleted at 140, and seen: gone, for work from any version up to it.
    t.delete(&key);
    t.observe(None, 140);
    assert!(matches!(t.find(&key, "uid-late", 120), Found::Deleted));
    // Created again: the namesake is another Webhook.
    let mut again = late;
    again.uid = "uid-again".into();
    again.version = 150;
    t.apply(again);
    t.observe(None, 150);
    assert!(matches!(t.find(&key, "uid-late", 120), Found::Replaced));
    // Work routed here (version 0) never waits.
    assert!(matches!(t.find(&key, "uid-again", 0), Found::Route(_)));
}

#[test]
fn what_a_table_has_seen_is_per_watched_namespace_and_never_goes_back() {
    let mut t = RoutingTable::default();
    t.observe(Some("a"), 50);
    t.observe(Some("b"), 70);
    t.observe(Some("a"), 40);
    assert_eq!(t.seen("a"), 50);
    assert_eq!(t.seen("b"), 70);
    assert_eq!(t.seen("c"), 0);
    // One watch over every namespace covers them all.
    t.observe(None, 60);
    assert_eq!(t.seen("a"), 60);
    assert_eq!(t.seen("b"), 70);
    assert_eq!(t.seen("c"), 60);
}
