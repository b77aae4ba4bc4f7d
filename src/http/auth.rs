//! Who may call the API: a Kubernetes bearer token, checked by the API server (TokenReview),
//! then a SubjectAccessReview for the verb, resource and namespace, so cluster RBAC decides as
//! it does for kubectl. Both answers are cached briefly.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};

use super::error::ApiError;

const TOKEN_TTL: Duration = Duration::from_secs(30);
const DECISION_TTL: Duration = Duration::from_secs(10);
const MAX_CACHED: usize = 10_000;

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
type CachedCaller = (Option<Caller>, Instant);

#[derive(Clone)]
pub enum Authorizer {
    Kubernetes(Arc<KubeAuth>),
    /// `--disable-auth`: everyone may do everything. Development only.
    Disabled,
}

pub struct KubeAuth {
    client: Client,
    /// sha256(token) -> who it is (None: not valid), and when that was learned.
    tokens: Mutex<HashMap<[u8; 32], CachedCaller>>,
    decisions: Mutex<HashMap<Question, (bool, Instant)>>,
}

impl Authorizer {
    pub fn kubernetes(client: Client) -> Self {
        Authorizer::Kubernetes(Arc::new(KubeAuth {
            client,
            tokens: Mutex::new(HashMap::new()),
            decisions: Mutex::new(HashMap::new()),
        }))
    }

    /// Who is calling; 401 without a valid bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let auth = match self {
            Authorizer::Disabled => return Ok(Caller::anonymous_dev()),
            Authorizer::Kubernetes(auth) => auth,
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
                ApiError::unauthorized(
                    "a Kubernetes bearer token is required (Authorization: Bearer <token>)",
                )
            })?;
        auth.review_token(token).await
    }

    /// 403 unless RBAC lets `caller` do `verb` on `resource` in `namespace`.
    pub async fn authorize(
        &self,
        caller: &Caller,
        verb: &'static str,
        resource: &'static str,
        namespace: &str,
    ) -> Result<(), ApiError> {
        match self {
            Authorizer::Disabled => Ok(()),
            Authorizer::Kubernetes(auth) => {
                if auth
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
    }
}

impl KubeAuth {
    async fn review_token(&self, token: &str) -> Result<Caller, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((caller, at)) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && now < *at + TOKEN_TTL
        {
            return caller
                .clone()
                .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot review the token: {e}")))?;
        let status = answer.status.unwrap_or_default();
        let caller = match (status.authenticated, status.user) {
            (
                Some(true),
                Some(UserInfo {
                    username: Some(username),
                    uid,
                    groups,
                    extra,
                }),
            ) => Some(Caller {
                username,
                uid,
                groups: groups.unwrap_or_default(),
                extra,
            }),
            _ => None,
        };
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_CACHED {
            tokens.clear();
        }
        tokens.insert(key, (caller.clone(), now));
        caller.ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"))
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
        let now = Instant::now();
        if let Some((allowed, at)) = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && now < *at + DECISION_TTL
        {
            return Ok(*allowed);
        }
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
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot review access: {e}")))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if decisions.len() >= MAX_CACHED {
            decisions.clear();
        }
        decisions.insert(key, (allowed, now));
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_namespace_comes_from_the_username() {
        let sa = Caller {
            username: "system:serviceaccount:docs:ingest".into(),
            uid: None,
            groups: vec![],
            extra: None,
        };
        assert_eq!(sa.service_account_namespace(), Some("docs"));
        let user = Caller {
            username: "jane".into(),
            uid: None,
            groups: vec![],
            extra: None,
        };
        assert_eq!(user.service_account_namespace(), None);
    }
}
