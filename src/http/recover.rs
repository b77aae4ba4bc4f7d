//! `POST /api/webhooks/{id}/recover?since=` sends again every delivery to the Webhook that
//! failed for good since then, and `GET /api/webhooks/{id}/deliveries?document_id=` (or
//! `?delivery_id=`) finds deliveries beyond its 20 recent ones, both from what is retained
//! (see `crate::delivery::history`).
//!
//! Both are bounded beyond what one call reads: a recover republishes up to 1,000 deliveries,
//! so each Webhook may be recovered [`RECOVER_BURST`] times at once, then once every
//! [`RECOVER_EVERY`] (429 otherwise); and each call holds pages of whole DocumentEvents (and
//! a recover up to 1,000 failed ones), so at most [`HISTORY_READS`] of them read at once on a
//! replica, the others waiting up to [`HISTORY_READ_WAIT`] for a turn (503 then).

use crate::http::error::Problem;
use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt, api::ListParams};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiState, NamespaceQuery, WebhookLimiter,
    caller::{Caller, caller_for_action},
    error::ApiError,
    is_delivery_id, require_leader, take_webhook_token,
};
use crate::{
    crd::{DeliveryRecord, DocumentEvent, Outcome, TargetDelivery, TargetState, Webhook},
    delivery::{
        Source,
        history::{self, Lookup, MAX_FOUND, MAX_RECOVERED, MAX_SCANNED},
    },
    keys::WebhookKey,
    ports::Recovery,
};

/// DocumentEvents listed per request to the API server.
const LIST_PAGE: u32 = 500;
/// How long the DocumentEvent controller may take to queue what it is handed.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);

/// A Webhook may be recovered this many times at once...
pub const RECOVER_BURST: u32 = 3;
/// ...then once this often: each call may publish [`MAX_RECOVERED`] deliveries again (a
/// truncated answer is followed by another call, which gets its turn within this).
pub const RECOVER_EVERY: Duration = Duration::from_secs(10);

/// The bucket of recover calls of each Webhook.
pub(super) fn limiter() -> WebhookLimiter {
    let quota = governor::Quota::with_period(RECOVER_EVERY)
        .expect("a period")
        .allow_burst(std::num::NonZeroU32::new(RECOVER_BURST).expect("a burst"));
    Arc::new(governor::RateLimiter::keyed(quota))
}

/// Recover and search calls reading history at once on one replica: each holds a page of up
/// to [`LIST_PAGE`] whole DocumentEvents at a time (a recover also the failed ones it found,
/// up to [`MAX_RECOVERED`], or as many stored work items), so that together they hold at most
/// this many times that.
pub const HISTORY_READS: usize = 4;
/// How long a call waits for its turn to read before it is answered 503.
pub const HISTORY_READ_WAIT: Duration = Duration::from_secs(2);

/// The turns to read history (see [`HISTORY_READS`]).
#[derive(Debug)]
pub struct HistoryReads {
    turns: tokio::sync::Semaphore,
    at_once: usize,
    wait: Duration,
}

impl HistoryReads {
    pub fn new(at_once: usize, wait: Duration) -> Self {
        Self {
            turns: tokio::sync::Semaphore::new(at_once),
            at_once,
            wait,
        }
    }

    /// A turn to read history, held until dropped; 503 `history_busy` with Retry-After when
    /// none came within the wait.
    pub async fn enter(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        match tokio::time::timeout(self.wait, self.turns.acquire()).await {
            Ok(Ok(turn)) => Ok(turn),
            _ => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Problem::HistoryBusy,
                    format!(
                        "{n} searches and recovers are reading the retained deliveries on this replica, the most it runs at once (each holds up to {LIST_PAGE} DocumentEvents in memory); none ended within {wait} s: retry in a second",
                        n = self.at_once,
                        wait = self.wait.as_secs_f64(),
                    ),
                );
                error.retry_after = Some(1);
                Err(error)
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RecoverQuery {
    pub since: Option<String>,
}

/// `since`: an RFC 3339 time; 400 saying how to write one otherwise.
pub(super) fn parse_since(since: Option<&str>) -> Result<Timestamp, ApiError> {
    const FORMAT: &str =
        "an RFC 3339 time such as 2026-01-31T12:00:00Z (UTC, or an offset written %2B01:00)";
    let bad = |why: String| ApiError::new(StatusCode::BAD_REQUEST, Problem::InvalidQuery, why);
    match since {
        None | Some("") => Err(bad(format!(
            "give ?since= with {FORMAT}: deliveries that failed since then are sent again"
        ))),
        Some(text) => text
            .parse::<Timestamp>()
            .map_err(|_| bad(format!("since={text:?} is not {FORMAT}"))),
    }
}

/// Reads the namespace's DocumentEvents page by page, handing each to `visit` until it returns
/// false; at most [`MAX_SCANNED`]. Whether every one was read.
async fn scan_events(
    api: &Api<DocumentEvent>,
    mut visit: impl FnMut(DocumentEvent) -> bool,
) -> Result<bool, ApiError> {
    let mut params = ListParams::default().limit(LIST_PAGE);
    let mut read = 0;
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|e| ApiError::from_kube(e, "document events"))?;
        for de in page.items {
            read += 1;
            if !visit(de) {
                return Ok(false);
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => {
                if read >= MAX_SCANNED {
                    return Ok(false);
                }
                params = params.continue_token(&token);
            }
            _ => return Ok(true),
        }
    }
}

fn stream_unavailable(why: String) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Problem::JetstreamUnavailable,
        format!("the JetStream stream could not be read: {why}; retry"),
    );
    error.retry_after = Some(1);
    error
}

/// `POST /api/webhooks/{id}/recover?since=RFC3339`.
pub async fn recover(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    Query(r): Query<RecoverQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller_for_action(&state, &q, &headers, "recover").await?;
    let since = parse_since(r.since.as_deref())?;
    let (queued, truncated) = recover_failed(&state, &c, &id, since).await?;
    Ok(Json(json!({"queued": queued, "truncated": truncated})))
}

/// Queues again the deliveries to Webhook `id` that failed since `since`, at most
/// [`MAX_RECOVERED`]; returns how many, and whether there were more.
pub(super) async fn recover_failed(
    state: &ApiState,
    c: &Caller,
    id: &str,
    since: k8s_openapi::jiff::Timestamp,
) -> Result<(usize, bool), ApiError> {
    let w = c.webhook(id).await?;
    // The DocumentEvent controller owns their status and runs on the leader only.
    require_leader(state, "recover")?;
    take_webhook_token(
        &state.recover_limiter,
        &c.namespace,
        id,
        &format!(
            "recover calls for webhook {id} are limited to {RECOVER_BURST} at once, then one every {} s (each may send {MAX_RECOVERED} deliveries again)",
            RECOVER_EVERY.as_secs()
        ),
    )?;
    let _reading = state.history_reads.enter().await?;
    let webhook_uid = w.metadata.uid.clone().unwrap_or_default();

    let mut failed = Vec::new();
    let mut truncated = false;
    let complete = scan_events(&Api::namespaced(state.client.clone(), &c.namespace), |de| {
        if let Some(target) = history::failed_delivery(&de, id, &webhook_uid, since) {
            if failed.len() == MAX_RECOVERED {
                truncated = true;
                return false;
            }
            let delivery_id = target.id.clone();
            failed.push((de, delivery_id));
        }
        true
    })
    .await?;
    truncated |= !complete;
    let mut queued = 0;
    if !failed.is_empty() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let recovery = Recovery {
            webhook: id.to_owned(),
            deliveries: failed,
            queued: tx,
        };
        let not_taken = || {
            let mut error = ApiError::unavailable(
                "the delivery of DocumentEvents is not running on this replica yet; retry",
            );
            error.retry_after = Some(1);
            error
        };
        if !state.recoveries.send(recovery).await {
            return Err(not_taken());
        }
        queued = tokio::time::timeout(HAND_OVER_TIMEOUT, rx)
            .await
            .map_err(|_| not_taken())?
            .map_err(|_| not_taken())?;
    }
    if let Some(bus) = &state.bus
        && queued < MAX_RECOVERED
    {
        let key = WebhookKey::new(&c.namespace, id);
        let from_stream =
            history::recover_from_stream(bus, &key, &webhook_uid, since, MAX_RECOVERED - queued)
                .await
                .map_err(stream_unavailable)?;
        queued += from_stream.queued;
        truncated |= from_stream.truncated;
    }
    tracing::info!(webhook = %id, namespace = %c.namespace, %since, queued, "recover: failed deliveries queued again");
    Ok((queued, truncated))
}

#[derive(Debug, Default, Deserialize)]
pub struct SearchQuery {
    pub document_id: Option<String>,
    pub delivery_id: Option<String>,
}

impl SearchQuery {
    /// None: no search asked (the recent deliveries); a bad query is 400.
    pub fn lookup(&self) -> Result<Option<Lookup>, ApiError> {
        let bad = |why: &str| ApiError::new(StatusCode::BAD_REQUEST, Problem::InvalidQuery, why);
        match (self.document_id.as_deref(), self.delivery_id.as_deref()) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(bad("give either document_id or delivery_id, not both")),
            (Some(document_id), None) => {
                if document_id.is_empty() || document_id.len() > 253 {
                    return Err(bad(
                        "document_id must be 1 to 253 characters: the event's data.document_id",
                    ));
                }
                Ok(Some(Lookup::DocumentId(document_id.to_owned())))
            }
            (None, Some(delivery_id)) => {
                if !is_delivery_id(delivery_id) {
                    return Err(bad(
                        "delivery_id must be a delivery id as sent in X-Webhook-Delivery, such as msg_0123abcd...",
                    ));
                }
                Ok(Some(Lookup::DeliveryId(delivery_id.to_owned())))
            }
        }
    }
}

/// A delivery record in the shape of the recent deliveries.
pub fn record_json(r: &DeliveryRecord) -> Value {
    json!({
        "id": r.id,
        "event": r.event,
        "source": r.source,
        "attempt": r.attempt,
        "outcome": r.outcome,
        "success": r.outcome == Outcome::Succeeded,
        "status_code": r.http_status,
        "response_time_ms": r.duration_ms,
        "created_at": r.time.0.to_string(),
        "error": r.error,
        "document_event": document_event_of(r),
    })
}

/// The DocumentEvent a recorded attempt delivered, for a link to it: its `source`, unless that
/// names another origin (direct or JetStream ingest, `/test`, `/redeliver`), which leaves none.
pub fn document_event_of(r: &DeliveryRecord) -> Option<&str> {
    match Source::parse(&r.source) {
        Source::DocumentEvent(_) if super::is_object_name(&r.source) => Some(&r.source),
        _ => None,
    }
}

/// A DocumentEvent's delivery in the same shape: where it stands now (`state`), after
/// `attempt` attempts.
fn target_json(de: &DocumentEvent, t: &TargetDelivery) -> Value {
    let outcome = match t.state {
        TargetState::Succeeded => Some(Outcome::Succeeded),
        TargetState::Failed => Some(Outcome::Failed),
        TargetState::Pending if t.attempts > 0 => Some(Outcome::Retrying),
        TargetState::Pending | TargetState::Held => None,
    };
    json!({
        "id": t.id,
        "event": de.spec.type_.as_str(),
        "source": de.name_any(),
        "attempt": t.attempts,
        "outcome": outcome,
        "success": t.state == TargetState::Succeeded,
        "status_code": t.http_status,
        "response_time_ms": null,
        "created_at": t.last_attempt_time.as_ref().map(|t| t.0.to_string()),
        "error": t.error,
        "state": t.state,
        "document_event": de.name_any(),
        "document_id": de.spec.data.get("document_id"),
    })
}

/// `GET /api/webhooks/{id}/deliveries?document_id=` or `?delivery_id=`: the deliveries to `w`
/// that match, from the retained DocumentEvents and (JetStream mode) the stream's attempt
/// records, at most [`MAX_FOUND`].
pub async fn search(
    state: &ApiState,
    c: &Caller,
    w: &Webhook,
    lookup: Lookup,
) -> Result<Json<Value>, ApiError> {
    let (found, truncated) = find_deliveries(state, c, w, lookup).await?;
    let found: Vec<Value> = found
        .iter()
        .map(|found| match found {
            Found::Recorded(r) => record_json(r),
            Found::Stored(de, t) => target_json(de, t),
        })
        .collect();
    Ok(Json(json!({"deliveries": found, "truncated": truncated})))
}

/// A delivery found in what is retained: an attempt record (JetStream mode's stream), or where
/// a DocumentEvent's delivery stands now.
pub(super) enum Found {
    Recorded(DeliveryRecord),
    Stored(Arc<DocumentEvent>, TargetDelivery),
}

/// The deliveries to `w` that match `lookup`, at most [`MAX_FOUND`], and whether the search
/// stopped before the end of what is retained.
pub(super) async fn find_deliveries(
    state: &ApiState,
    c: &Caller,
    w: &Webhook,
    lookup: Lookup,
) -> Result<(Vec<Found>, bool), ApiError> {
    let _reading = state.history_reads.enter().await?;
    let name = w.name_any();
    let webhook_uid = w.metadata.uid.clone().unwrap_or_default();
    let mut found = Vec::new();
    let complete = scan_events(&Api::namespaced(state.client.clone(), &c.namespace), |de| {
        if let Some(t) = history::matching_delivery(&de, &name, &webhook_uid, &lookup) {
            let t = t.clone();
            found.push(Found::Stored(Arc::new(de), t));
        }
        found.len() < MAX_FOUND
    })
    .await?;
    let mut truncated = !complete;
    if let Some(bus) = &state.bus
        && found.len() < MAX_FOUND
    {
        let key = WebhookKey::new(&c.namespace, &name);
        let (records, complete) = history::search_stream(bus, &key, &webhook_uid, &lookup)
            .await
            .map_err(stream_unavailable)?;
        truncated |= !complete;
        let room = MAX_FOUND - found.len();
        found.extend(records.into_iter().take(room).map(Found::Recorded));
    }
    Ok((found, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_attempts_link_their_document_event() {
        let record = |source: &str| DeliveryRecord {
            id: "msg_1".into(),
            event: "document.completed".into(),
            source: source.into(),
            attempt: 1,
            outcome: Outcome::Succeeded,
            http_status: Some(200),
            duration_ms: 3,
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(0).unwrap(),
            ),
            error: None,
        };
        assert_eq!(
            record_json(&record("document-completed-x7k2p"))["document_event"],
            "document-completed-x7k2p"
        );
        for other in ["ingest", "jetstream", "test", "redeliver"] {
            assert_eq!(record_json(&record(other))["document_event"], Value::Null);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn history_is_read_by_a_bounded_number_of_calls_at_once() {
        let reads = Arc::new(HistoryReads::new(2, Duration::from_secs(2)));
        let first = reads.enter().await.unwrap();
        let _second = reads.enter().await.unwrap();
        // A third waits for a turn, and is refused once the wait is over.
        let waited = tokio::time::Instant::now();
        let e = reads.enter().await.unwrap_err();
        assert_eq!(waited.elapsed(), Duration::from_secs(2));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((e.code, e.retry_after), (Problem::HistoryBusy, Some(1)));
        assert!(
            e.message.contains("2 searches and recovers"),
            "{}",
            e.message
        );
        // A turn that ends within the wait is taken.
        let third = tokio::spawn({
            let reads = reads.clone();
            async move {
                let started = tokio::time::Instant::now();
                let taken = reads.enter().await.map(drop).is_ok();
                (taken, started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(first);
        let (taken, after) = third.await.unwrap();
        assert!(taken);
        assert_eq!(after, Duration::from_millis(500));
    }

    #[test]
    fn a_webhook_is_recovered_three_times_at_once_then_every_ten_seconds() {
        let limiter = limiter();
        let limit = "recover calls for webhook w are limited";
        for _ in 0..RECOVER_BURST {
            take_webhook_token(&limiter, "docs", "w", limit).unwrap();
        }
        let e = take_webhook_token(&limiter, "docs", "w", limit).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, "rate_limited");
        let retry_after = e.retry_after.unwrap();
        assert!(
            (1..=RECOVER_EVERY.as_secs()).contains(&retry_after),
            "{retry_after}"
        );
        assert!(
            e.message.starts_with(limit)
                && e.message.ends_with(&format!("retry in {retry_after} s")),
            "{}",
            e.message
        );
        // Another Webhook, or the same name in another namespace, has its own bucket.
        take_webhook_token(&limiter, "docs", "other", limit).unwrap();
        take_webhook_token(&limiter, "other-namespace", "w", limit).unwrap();
    }

    #[test]
    fn the_openapi_document_says_how_recover_and_search_are_bounded() {
        let doc: Value = serde_json::from_str(super::super::OPENAPI).unwrap();
        let recover = &doc["paths"]["/api/webhooks/{id}/recover"]["post"];
        assert!(recover["responses"]["429"].is_object(), "{recover}");
        let text = recover["description"].as_str().unwrap();
        assert!(
            text.contains("3 calls at once, then one every 10 s") && text.contains("history_busy"),
            "{text}"
        );
        let search = &doc["paths"]["/api/webhooks/{id}/deliveries"]["get"];
        assert!(search["responses"]["503"].is_object(), "{search}");
        let text = search["description"].as_str().unwrap();
        assert!(text.contains("history_busy"), "{text}");
        assert_eq!(
            (
                RECOVER_BURST,
                RECOVER_EVERY,
                HISTORY_READS,
                HISTORY_READ_WAIT
            ),
            (3, Duration::from_secs(10), 4, Duration::from_secs(2)),
            "the figures the OpenAPI document and README give"
        );
    }

    #[test]
    fn since_must_be_an_rfc3339_time() {
        assert_eq!(
            parse_since(Some("2026-11-30T16:00:00Z")).unwrap(),
            "2026-11-30T16:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(parse_since(Some("2026-11-30T17:00:00+01:00")).is_ok());
        for bad in [None, Some(""), Some("yesterday"), Some("2026-11-30")] {
            let e = parse_since(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(e.message.contains("RFC 3339"), "{}", e.message);
        }
    }

    #[test]
    fn a_search_takes_one_of_document_id_and_delivery_id() {
        let q = |document_id: Option<&str>, delivery_id: Option<&str>| SearchQuery {
            document_id: document_id.map(str::to_owned),
            delivery_id: delivery_id.map(str::to_owned),
        };
        assert_eq!(q(None, None).lookup().unwrap(), None);
        assert_eq!(
            q(Some("123"), None).lookup().unwrap(),
            Some(Lookup::DocumentId("123".into()))
        );
        assert_eq!(
            q(None, Some("msg_ab12")).lookup().unwrap(),
            Some(Lookup::DeliveryId("msg_ab12".into()))
        );
        for bad in [
            q(Some("1"), Some("msg_1")),
            q(Some(""), None),
            q(None, Some("nope")),
            q(None, Some("")),
        ] {
            assert_eq!(bad.lookup().unwrap_err().status, StatusCode::BAD_REQUEST);
        }
    }
}
