use super::*;

fn route(ns: &str, name: &str, events: &[WebhookEvent]) -> Route {
    Route {
        key: WebhookKey::new(ns, name),
        uid: format!("uid-{name}"),
        generation: 1,
        url: format!("https://example.com/{name}"),
        events: events.to_vec(),
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

#[test]
fn lookup_event_applies_each_routes_filter_and_counts_the_results() {
    let metrics = Metrics::default();
    let mut t = RoutingTable::default();
    let mut only_folder_1 = route("docs", "folder-1", &[WebhookEvent::All]);
    only_folder_1.filter = Some(EventFilter::compile("data.folder_id == 1").unwrap());
    let mut broken = route("docs", "broken", &[WebhookEvent::All]);
    broken.state = RouteState::Blocked {
        reason: FILTER_INVALID,
        message: "spec.filter: ...".into(),
    };
    t.apply(only_folder_1);
    t.apply(broken);
    t.apply(route("docs", "all", &[WebhookEvent::All]));
    let targets = |data: serde_json::Value| {
        let data = data.as_object().cloned().unwrap();
        let facts = EventFacts::new(EventType::Completed, "2023-06-15T10:35:00Z", &data);
        t.lookup_event("docs", &facts, &metrics)
            .map(|r| r.key.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        targets(serde_json::json!({"folder_id": 1})),
        ["all", "folder-1"]
    );
    assert_eq!(targets(serde_json::json!({"folder_id": 2})), ["all"]);
    // A missing field is an evaluation error: not delivered, and counted.
    assert_eq!(targets(serde_json::json!({})), ["all"]);
    let count = |result| {
        metrics
            .filter_evaluations
            .get_or_create(&FilterLabels { result })
            .get()
    };
    assert_eq!(
        (count("matched"), count("not_matched"), count("error")),
        (1, 1, 1)
    );
}
