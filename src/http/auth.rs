//! Who may call the API: a Kubernetes bearer token, checked by the API server (TokenReview)
//! for hookrelay's audience, then a SubjectAccessReview for the verb, resource and namespace,
//! so cluster RBAC decides as it does for kubectl. Both answers are cached briefly in bounded
//! caches, and the reviews in flight are limited so that a flood of bogus tokens cannot use up
//! the operator's share of the API server (API Priority and Fairness) that its watches need.

use crate::http::error::Problem;
use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::http::HeaderMap;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use moka::future::Cache;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{error::ApiError, refuse_unwatched};
use crate::ports::KnownNamespaces;

/// How long a valid token's identity is reused.
const TOKEN_TTL: Duration = Duration::from_secs(30);
/// How long a refused token stays refused without asking again: short, so that a token
/// minted a moment later (or a fixed RBAC binding) works quickly, yet a sprayer pays.
const INVALID_TOKEN_TTL: Duration = Duration::from_secs(5);
const DECISION_TTL: Duration = Duration::from_secs(10);
/// How long a token seen valid keeps its reviews apart from unknown tokens'.
const KNOWN_TTL: Duration = Duration::from_secs(600);
const MAX_CACHED: u64 = 10_000;
/// How long a request waits for a review slot before it is told to come back.
const REVIEW_SLOT_WAIT: Duration = Duration::from_millis(500);
/// Access reviews one identity may cause that no cached answer spares, in a burst ...
const IDENTITY_REVIEW_BURST: u32 = 40;
/// ... and then per second: a caller spraying ever-new namespaces (or verbs) cannot take the
/// review slots every other caller shares.
const IDENTITY_REVIEWS_PER_SECOND: u32 = 10;
/// How long a review waits for the API server. One that does not answer (paused, partitioned)
/// gets the request a 503 saying so, well before --request-timeout's 408 (which blames the
/// client), and frees its review slot.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// `create` of a review, bounded by [`REVIEW_TIMEOUT`]; `what` names it in the error.
async fn ask<K>(client: &Client, review: &K, what: &str) -> Result<K, ApiError>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let answer = tokio::time::timeout(
        REVIEW_TIMEOUT,
        Api::<K>::all(client.clone()).create(&PostParams::default(), review),
    )
    .await
    .map_err(|_| {
        let mut error = ApiError::unavailable(format!(
            "cannot review {what}: the Kubernetes API server did not answer within {}s",
            REVIEW_TIMEOUT.as_secs()
        ));
        error.retry_after = Some(1);
        error
    })?;
    answer.map_err(|e| ApiError::unavailable(format!("cannot review {what}: {e}")))
}

/// The caller, as the API server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

impl Caller {
    /// The namespace of a ServiceAccount caller.
    pub fn service_account_namespace(&self) -> Option<&str> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':').map(|(ns, _)| ns)
    }

    fn anonymous_dev() -> Self {
        Self {
            username: "hookrelay:auth-disabled".into(),
            uid: None,
            groups: Vec::new(),
            extra: None,
        }
    }
}

/// (user, uid, groups, verb, resource, namespace): everything the review is asked about.
type Question = (
    String,
    Option<String>,
    Vec<String>,
    &'static str,
    &'static str,
    String,
);

/// How the API authenticates and authorizes, and which namespaces it serves.
#[derive(Clone)]
pub struct Authorizer {
    /// None: `--disable-auth`, everyone may do everything. Development only.
    kube: Option<Arc<KubeAuth>>,
    /// The watched namespaces; empty: all.
    watched: Arc<[String]>,
    /// In all-namespaces mode, the namespaces that exist (see [`Authorizer::knowing`]).
    known: Option<KnownNamespaces>,
}

/// Settings of the Kubernetes-backed authorizer.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// The audience tokens must be minted for; None accepts the API server's own audience.
    pub audience: Option<String>,
    /// TokenReviews and SubjectAccessReviews in flight at most.
    pub max_concurrent_reviews: usize,
}

pub struct KubeAuth {
    client: Client,
    audience: Option<String>,
    tokens: TokenCache,
    decisions: Cache<Question, bool>,
    /// Slots for TokenReviews of tokens never seen valid: all a flood of bogus tokens can use.
    unknown_token_reviews: Semaphore,
    /// Slots for SubjectAccessReviews and for reviewing again a token seen valid lately, so
    /// that callers who authenticated before keep being served during such a flood.
    known_caller_reviews: Semaphore,
    /// sha256 of tokens seen valid in the last [`KNOWN_TTL`].
    known_tokens: Cache<[u8; 32], ()>,
    /// Uncached access reviews per identity (username).
    review_budget: governor::DefaultKeyedRateLimiter<String>,
    /// TokenReviews sent, for tests and the curious.
    token_reviews: AtomicU64,
    /// SubjectAccessReviews sent.
    access_reviews: AtomicU64,
}

impl Authorizer {
    pub fn kubernetes(client: Client, settings: AuthSettings) -> Self {
        Self {
            kube: Some(Arc::new(KubeAuth {
                client,
                audience: settings.audience.filter(|a| !a.is_empty()),
                tokens: TokenCache::new(),
                decisions: Cache::builder()
                    .max_capacity(MAX_CACHED)
                    .time_to_live(DECISION_TTL)
                    .build(),
                unknown_token_reviews: Semaphore::new(settings.max_concurrent_reviews.max(1)),
                known_caller_reviews: Semaphore::new(settings.max_concurrent_reviews.max(1)),
                known_tokens: Cache::builder()
                    .max_capacity(MAX_CACHED)
                    .time_to_live(KNOWN_TTL)
                    .build(),
                review_budget: governor::RateLimiter::keyed(
                    governor::Quota::per_second(
                        NonZeroU32::new(IDENTITY_REVIEWS_PER_SECOND).expect("not zero"),
                    )
                    .allow_burst(NonZeroU32::new(IDENTITY_REVIEW_BURST).expect("not zero")),
                ),
                token_reviews: AtomicU64::new(0),
                access_reviews: AtomicU64::new(0),
            })),
            watched: Arc::new([]),
            known: None,
        }
    }

    /// `--disable-auth`.
    pub fn disabled() -> Self {
        Self {
            kube: None,
            watched: Arc::new([]),
            known: None,
        }
    }

    /// Refuse namespaces that do not exist, as `known` says once it has listed them, before
    /// any review: with the same answer as a review's no, so that it tells nobody which
    /// namespaces exist.
    pub fn knowing(mut self, known: KnownNamespaces) -> Self {
        self.known = Some(known);
        self
    }

    /// Refuse namespaces outside `namespaces` (empty: all are watched).
    pub fn watching(mut self, namespaces: &[String]) -> Self {
        self.watched = namespaces.into();
        self
    }

    /// Whether namespaces that do not exist are refused before review now (the namespace list
    /// is loaded).
    pub fn knows_namespaces(&self) -> bool {
        self.known
            .as_ref()
            .is_some_and(|k| k.contains("").is_some())
    }

    /// The watched namespaces (`--watch-namespace`); empty: all.
    pub fn watched(&self) -> &[String] {
        &self.watched
    }

    /// TokenReviews sent to the API server so far (0 with auth disabled).
    pub fn token_reviews(&self) -> u64 {
        self.kube
            .as_ref()
            .map_or(0, |k| k.token_reviews.load(Ordering::Relaxed))
    }

    /// SubjectAccessReviews sent, for tests and the curious.
    pub fn access_reviews(&self) -> u64 {
        self.kube
            .as_ref()
            .map_or(0, |k| k.access_reviews.load(Ordering::Relaxed))
    }

    /// Who is calling; 401 without a valid bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(auth) = &self.kube else {
            return Ok(Caller::anonymous_dev());
        };
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(format!(
                    "a Kubernetes bearer token is required (Authorization: Bearer <token>); {}",
                    auth.how_to_mint()
                ))
            })?;
        auth.review_token(token).await
    }

    /// 422 for a namespace this operator does not watch, else 403 unless RBAC lets `caller`
    /// do `verb` on `resource` in `namespace`.
    pub async fn authorize(
        &self,
        caller: &Caller,
        verb: &'static str,
        resource: &'static str,
        namespace: &str,
    ) -> Result<(), ApiError> {
        // Before any review: what is refused here costs the API server nothing.
        refuse_unwatched(namespace, &self.watched)?;
        let Some(auth) = &self.kube else {
            return Ok(());
        };
        let exists = self.known.as_ref().and_then(|k| k.contains(namespace));
        if exists != Some(false)
            && auth
                .review_access(caller, verb, resource, namespace)
                .await?
        {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{} may not {verb} {resource}.hookrelay.dev in namespace {namespace}",
                caller.username
            )))
        }
    }
}

/// sha256(token) -> who it is. Valid identities (30 s) and refused tokens (5 s) are kept in
/// two bounded caches, so that a flood of bogus tokens can only push out other bogus tokens,
/// never the identity of a caller who keeps coming.
struct TokenCache {
    valid: Cache<[u8; 32], Caller>,
    refused: Cache<[u8; 32], ()>,
}

/// Why no identity came back, shared by the callers of one coalesced review.
#[derive(Clone)]
enum NoCaller {
    Refused,
    Failed(ApiError),
}

impl TokenCache {
    fn new() -> Self {
        Self {
            valid: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(TOKEN_TTL)
                .build(),
            refused: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(INVALID_TOKEN_TTL)
                .build(),
        }
    }

    /// The cached answer for `token`, else `review`'s (None: refused); concurrent callers with
    /// the same token share one review. Errors (API server unavailable) are not cached.
    async fn get_or_review<F>(&self, token: &str, review: F) -> Result<Option<Caller>, ApiError>
    where
        F: Future<Output = Result<Option<Caller>, ApiError>>,
    {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if self.refused.contains_key(&key) {
            return Ok(None);
        }
        let found = self
            .valid
            .try_get_with(key, async {
                match review.await {
                    Ok(Some(caller)) => Ok(caller),
                    Ok(None) => {
                        self.refused.insert(key, ()).await;
                        Err(NoCaller::Refused)
                    }
                    Err(e) => Err(NoCaller::Failed(e)),
                }
            })
            .await;
        match found {
            Ok(caller) => Ok(Some(caller)),
            Err(e) => match &*e {
                NoCaller::Refused => Ok(None),
                NoCaller::Failed(e) => Err(e.clone()),
            },
        }
    }
}

impl KubeAuth {
    fn how_to_mint(&self) -> String {
        match &self.audience {
            Some(audience) => format!(
                "mint one with `kubectl create token <serviceaccount> --audience {audience}` (in-cluster: a projected ServiceAccount token with that audience)"
            ),
            None => "mint one with `kubectl create token <serviceaccount>`".into(),
        }
    }

    /// 429 + Retry-After when `identity` has used its budget of uncached access reviews.
    fn within_review_budget(&self, identity: &str) -> Result<(), ApiError> {
        // Keyed by the identities that asked lately; the idle ones are dropped now and then.
        if self.review_budget.len() > MAX_CACHED as usize {
            self.review_budget.retain_recent();
        }
        let Err(not_until) = self.review_budget.check_key(&identity.to_owned()) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut error = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            Problem::TooManyReviews,
            format!(
                "{identity} asked about too many namespaces or actions at once ({IDENTITY_REVIEW_BURST}, then {IDENTITY_REVIEWS_PER_SECOND} a second, not answered from the cache); retry later"
            ),
        );
        error.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        Err(error)
    }

    /// A slot for one review, or 503 + Retry-After when too many are in flight.
    async fn review_slot<'a>(&self, slots: &'a Semaphore) -> Result<SemaphorePermit<'a>, ApiError> {
        match tokio::time::timeout(REVIEW_SLOT_WAIT, slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let mut error = ApiError::unavailable(
                    "too many authentication reviews are in progress; retry in a second",
                );
                error.retry_after = Some(1);
                Err(error)
            }
        }
    }

    async fn review_token(&self, token: &str) -> Result<Caller, ApiError> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let slots = if self.known_tokens.contains_key(&hash) {
            &self.known_caller_reviews
        } else {
            &self.unknown_token_reviews
        };
        let caller = self
            .tokens
            .get_or_review(token, async {
                let _slot = self.review_slot(slots).await?;
                self.token_reviews.fetch_add(1, Ordering::Relaxed);
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_owned()),
                        audiences: self.audience.clone().map(|a| vec![a]),
                    },
                    ..Default::default()
                };
                let answer = ask(&self.client, &review, "the token").await?;
                Ok(reviewed_caller(
                    answer.status.unwrap_or_default(),
                    self.audience.as_deref(),
                ))
            })
            .await?;
        if caller.is_some() {
            self.known_tokens.insert(hash, ()).await;
        }
        caller.ok_or_else(|| {
            let audience = self
                .audience
                .as_deref()
                .map(|a| format!(" for audience {a:?}"))
                .unwrap_or_default();
            ApiError::unauthorized(format!(
                "the bearer token is not valid{audience}: {}",
                self.how_to_mint()
            ))
        })
    }

    async fn review_access(
        &self,
        caller: &Caller,
        verb: &'static str,
        resource: &'static str,
        namespace: &str,
    ) -> Result<bool, ApiError> {
        let mut groups = caller.groups.clone();
        groups.sort();
        let key = (
            caller.username.clone(),
            caller.uid.clone(),
            groups,
            verb,
            resource,
            namespace.to_owned(),
        );
        let review = async {
            self.within_review_budget(&caller.username)?;
            let _slot = self.review_slot(&self.known_caller_reviews).await?;
            self.access_reviews.fetch_add(1, Ordering::Relaxed);
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(caller.username.clone()),
                    uid: caller.uid.clone(),
                    groups: Some(caller.groups.clone()),
                    extra: caller.extra.clone(),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(crate::crd::GROUP.into()),
                        resource: Some(resource.into()),
                        verb: Some(verb.into()),
                        namespace: Some(namespace.to_owned()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = ask(&self.client, &review, "access").await?;
            Ok::<_, ApiError>(answer.status.is_some_and(|s| s.allowed))
        };
        self.decisions
            .try_get_with(key, review)
            .await
            .map_err(|e| (*e).clone())
    }
}

/// The caller a TokenReview answer names, if it authenticated the token for `audience`.
fn reviewed_caller(status: TokenReviewStatus, audience: Option<&str>) -> Option<Caller> {
    // The API server answers for the audiences it was asked about; check, do not assume.
    let for_us = audience.is_none_or(|a| {
        status
            .audiences
            .as_ref()
            .is_some_and(|auds| auds.iter().any(|x| x == a))
    });
    match (status.authenticated, status.user) {
        (
            Some(true),
            Some(UserInfo {
                username: Some(username),
                uid,
                groups,
                extra,
            }),
        ) if for_us => Some(Caller {
            username,
            uid,
            groups: groups.unwrap_or_default(),
            extra,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A flood of unknown tokens holding every review slot for them does not stop a caller whose
    /// token was valid before from being reviewed again.
    #[tokio::test]
    async fn callers_seen_valid_are_reviewed_apart_from_unknown_tokens() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let auth = Authorizer::kubernetes(
            Client::new(service, "default"),
            AuthSettings {
                audience: Some("hookrelay".into()),
                max_concurrent_reviews: 1,
            },
        );
        let kube = auth.kube.clone().unwrap();
        let known: [u8; 32] = Sha256::digest(b"known-token").into();
        kube.known_tokens.insert(known, ()).await;
        // The flood: every slot for unknown tokens is taken.
        let _flood = kube.unknown_token_reviews.acquire().await.unwrap();
        let unknown = kube.review_token("never-seen").await.unwrap_err();
        assert_eq!(unknown.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);

        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("a TokenReview");
            send.send_response(
                Response::builder()
                    .status(201)
                    .body(Body::from(
                        serde_json::to_vec(&serde_json::json!({
                            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                            "spec": {},
                            "status": {"authenticated": true, "audiences": ["hookrelay"],
                                       "user": {"username": "system:serviceaccount:a:b"}},
                        }))
                        .unwrap(),
                    ))
                    .unwrap(),
            );
        });
        let caller = kube.review_token("known-token").await.expect("reviewed");
        assert_eq!(caller.username, "system:serviceaccount:a:b");
        server.await.unwrap();
    }

    /// An API server that takes the review and never answers: the caller hears 503 (and the
    /// slot is free again) after REVIEW_TIMEOUT, not when the request's own limit cuts it off.
    #[tokio::test(start_paused = true)]
    async fn a_review_the_api_server_never_answers_is_a_503_after_the_review_timeout() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let auth = Authorizer::kubernetes(
            Client::new(service, "default"),
            AuthSettings {
                audience: Some("hookrelay".into()),
                max_concurrent_reviews: 1,
            },
        );
        let kube = auth.kube.clone().unwrap();
        // Takes the request and holds its answer.
        let silent = tokio::spawn(async move {
            let request = handle.next_request().await;
            std::future::pending::<()>().await;
            drop(request);
        });
        let review = tokio::time::timeout(REVIEW_TIMEOUT * 2, kube.review_token("a-token"))
            .await
            .expect("the review ends on its own")
            .unwrap_err();
        assert_eq!(review.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(review.retry_after, Some(1));
        assert!(
            review.message.contains("did not answer"),
            "{}",
            review.message
        );
        assert_eq!(kube.unknown_token_reviews.available_permits(), 1);
        silent.abort();
    }

    fn user(name: &str) -> Caller {
        Caller {
            username: name.into(),
            uid: None,
            groups: vec![],
            extra: None,
        }
    }

    #[test]
    fn service_account_namespace_comes_from_the_username() {
        assert_eq!(
            user("system:serviceaccount:docs:ingest").service_account_namespace(),
            Some("docs")
        );
        assert_eq!(user("jane").service_account_namespace(), None);
    }

    #[tokio::test]
    async fn a_flood_of_bogus_tokens_does_not_evict_a_caller_who_keeps_coming() {
        let cache = TokenCache::new();
        let reviews = AtomicUsize::new(0);
        // Counts reviews made, not futures built: a cache hit never polls its review.
        let review = |valid: bool| {
            let reviews = &reviews;
            async move {
                reviews.fetch_add(1, Ordering::Relaxed);
                Ok(valid.then(|| user("system:serviceaccount:docs:ingest")))
            }
        };
        for _ in 0..5 {
            assert!(
                cache
                    .get_or_review("good", review(true))
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        // More distinct bogus tokens than the cache holds (the old map was cleared whole at
        // 10,000), while the valid caller keeps calling as usual.
        for i in 0..(MAX_CACHED as usize * 2) {
            let bogus = format!("bogus-{i}");
            assert_eq!(cache.get_or_review(&bogus, review(false)).await, Ok(None));
            if i % 100 == 0 {
                assert!(
                    cache
                        .get_or_review("good", review(true))
                        .await
                        .unwrap()
                        .is_some()
                );
            }
        }
        cache.refused.run_pending_tasks().await;
        assert!(cache.refused.entry_count() <= MAX_CACHED);
        let before = reviews.load(Ordering::Relaxed);
        assert_eq!(
            before,
            1 + MAX_CACHED as usize * 2,
            "the valid token was reviewed once, each bogus one once"
        );
        let again = cache
            .get_or_review("good", async {
                panic!("the valid caller's entry was evicted by the flood")
            })
            .await;
        assert_eq!(again, Ok(Some(user("system:serviceaccount:docs:ingest"))));
        assert_eq!(reviews.load(Ordering::Relaxed), before);
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_token_share_one_review_and_errors_are_not_cached() {
        let cache = Arc::new(TokenCache::new());
        let reviews = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let lookups: Vec<_> = (0..20)
            .map(|_| {
                let (cache, reviews, gate) = (cache.clone(), reviews.clone(), gate.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_review("same", async move {
                            reviews.fetch_add(1, Ordering::Relaxed);
                            gate.notified().await;
                            Ok(Some(user("jane")))
                        })
                        .await
                })
            })
            .collect();
        // Lets the one review finish once it has started (the others wait on it).
        while reviews.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        gate.notify_one();
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap(), Ok(Some(user("jane"))));
        }
        assert_eq!(reviews.load(Ordering::Relaxed), 1);

        let down = cache
            .get_or_review("other", async { Err(ApiError::unavailable("down")) })
            .await;
        assert_eq!(down.unwrap_err().code, "unavailable");
        let up = cache
            .get_or_review("other", async { Ok(Some(user("joe"))) })
            .await;
        assert_eq!(up, Ok(Some(user("joe"))));
    }

    #[tokio::test]
    async fn refusals_are_remembered_apart_from_identities() {
        let cache = TokenCache::new();
        assert_eq!(
            cache.get_or_review("bogus", async { Ok(None) }).await,
            Ok(None)
        );
        let again = cache
            .get_or_review("bogus", async {
                panic!("a refusal is remembered for a while")
            })
            .await;
        assert_eq!(again, Ok(None));
        assert_eq!(
            cache.valid.entry_count() + cache.valid.iter().count() as u64,
            0
        );
        assert!(INVALID_TOKEN_TTL < TOKEN_TTL);
    }

    #[test]
    fn a_token_is_valid_only_for_the_audience_asked_about() {
        let status = |audiences: Option<Vec<&str>>| TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            user: Some(UserInfo {
                username: Some("jane".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            reviewed_caller(status(Some(vec!["hookrelay"])), Some("hookrelay")),
            Some(user("jane"))
        );
        assert_eq!(
            reviewed_caller(
                status(Some(vec!["https://kubernetes.default.svc"])),
                Some("hookrelay")
            ),
            None
        );
        assert_eq!(reviewed_caller(status(None), Some("hookrelay")), None);
        assert_eq!(reviewed_caller(status(None), None), Some(user("jane")));
        let refused = TokenReviewStatus {
            authenticated: Some(false),
            ..status(Some(vec!["hookrelay"]))
        };
        assert_eq!(reviewed_caller(refused, Some("hookrelay")), None);
    }

    #[tokio::test]
    async fn unwatched_namespaces_are_refused_before_any_review() {
        let auth = Authorizer::disabled().watching(&["a".to_owned()]);
        let caller = user("jane");
        auth.authorize(&caller, "create", "documentevents", "a")
            .await
            .unwrap();
        let refused = auth
            .authorize(&caller, "create", "documentevents", "default")
            .await
            .unwrap_err();
        assert_eq!(refused.status.as_u16(), 422);
        assert_eq!(refused.code, "namespace_not_watched");
        let everything = Authorizer::disabled();
        everything
            .authorize(&caller, "create", "documentevents", "default")
            .await
            .unwrap();
    }
}
