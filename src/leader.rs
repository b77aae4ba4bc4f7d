//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it.
//!
//! Every replica serves the REST API and keeps its routing table warm; only the leader runs the
//! DocumentEvent controller and writes status and Events. A candidate takes the Lease when it is
//! free or when its record has not changed for `lease_duration` *as observed locally* (so clock
//! skew between replicas does not matter), renews it every `retry_period`, and gives up (the
//! process exits and restarts as a candidate) when it could not renew within `renew_deadline`.
//! On shutdown the leader releases the Lease once its status is written, so that a standby
//! takes over at its next retry instead of waiting out the lease duration.
//!
//! [`decide`] is the pure core (what to write, given the Lease and what was observed); the loop
//! around it only talks to the API server.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The Lease's name.
pub const LEASE_NAME: &str = "hookrelay";

/// Whether this replica leads now. Without leader election it always does.
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<bool>);

impl From<watch::Receiver<bool>> for Leadership {
    fn from(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }
}

impl Leadership {
    /// A replica that leads from the start and never stops (no `--leader-elect`).
    pub fn always() -> Self {
        Self(watch::Sender::new(true).subscribe())
    }

    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until this replica leads; false when it never will (the election ended).
    pub async fn acquired(&mut self) -> bool {
        self.0.wait_for(|leads| *leads).await.is_ok()
    }

    /// Waits for the next change; false once it can no longer change.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    /// Unique per process: a restarted replica is a new candidate.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error(
        "leadership lost: the Lease {namespace}/{LEASE_NAME} could not be renewed within {deadline:?} ({last_error})"
    )]
    Lost {
        namespace: String,
        deadline: Duration,
        last_error: String,
    },
}

/// What the Lease looked like when it was last seen to change, and when that was.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

/// What to do about the Lease now.
#[derive(Debug, PartialEq)]
enum Decision {
    /// Write this spec (create when there is no Lease).
    Write(LeaseSpec),
    /// Someone else holds it and it has not expired.
    Wait,
}

/// The pure core: given the current Lease spec (None: there is none), what this candidate
/// should write. `observed_since` is when the record was last seen to change.
fn decide(
    current: Option<&LeaseSpec>,
    me: &str,
    lease_duration: Duration,
    observed_since: Instant,
    now: Instant,
    wall: Timestamp,
) -> Decision {
    // Rounded up: a standby waits out the written value, which must not be shorter than the
    // leader's own renew deadline allows for.
    let seconds =
        i32::try_from(lease_duration.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
    let Some(spec) = current else {
        return Decision::Write(LeaseSpec {
            holder_identity: Some(me.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(wall)),
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        });
    };
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    if holder == Some(me) {
        return Decision::Write(LeaseSpec {
            renew_time: Some(MicroTime(wall)),
            lease_duration_seconds: Some(seconds),
            ..spec.clone()
        });
    }
    // The holder's own duration decides when its record is stale (a release sets it to 1s).
    let held_for = spec
        .lease_duration_seconds
        .map_or(lease_duration, |s| Duration::from_secs(s.max(0) as u64));
    let expired = holder.is_none() || now.duration_since(observed_since) >= held_for;
    if !expired {
        return Decision::Wait;
    }
    Decision::Write(LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(seconds),
        acquire_time: Some(MicroTime(wall)),
        renew_time: Some(MicroTime(wall)),
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
        ..LeaseSpec::default()
    })
}

/// Runs the election until `stop` fires (then releases the Lease if held) or leadership is
/// lost (an error: the process must stop delivering, so it exits and restarts).
pub async fn run(
    client: Client,
    config: ElectionConfig,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) -> Result<(), ElectionError> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    // While leading: when the last successful renewal *started*. The API server's record is at
    // least that recent, so a standby cannot take over before this + lease duration; leading
    // ends hard at this + renew deadline, which is earlier.
    let mut renewed_at = Instant::now();
    let round_timeout = config.retry_period.max(Duration::from_secs(1));
    let lost = |last_error: String| {
        // Stop everything that acts as the leader before anything else happens.
        leading.send_replace(false);
        Err(ElectionError::Lost {
            namespace: config.namespace.clone(),
            deadline: config.renew_deadline,
            last_error,
        })
    };
    loop {
        let leads = *leading.borrow();
        let started = Instant::now();
        let deadline = renewed_at + config.renew_deadline;
        if leads && started >= deadline {
            return lost("the renew deadline passed".into());
        }
        // A leader's round never outlives its deadline.
        let budget = if leads {
            round_timeout.min(deadline - started)
        } else {
            round_timeout
        };
        let round =
            tokio::time::timeout(budget, try_acquire_or_renew(&api, &config, &mut observed))
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("the Lease round timed out".into())));
        match round {
            Ok(true) => {
                renewed_at = started;
                if !leads {
                    tracing::info!(identity = %config.identity, lease = %format!("{}/{LEASE_NAME}", config.namespace), "became the leader");
                    leading.send_replace(true);
                }
            }
            Ok(false) if leads => return lost("another replica holds the Lease".into()),
            Ok(false) => {}
            // Another candidate wrote the Lease first: normal for a candidate, worth a retry
            // (until the renew deadline) for the leader.
            Err(kube::Error::Api(e)) if e.code == 409 && !leads => {}
            Err(error) => {
                tracing::warn!(%error, "leader election: cannot read or write the Lease");
                if leads && Instant::now() >= deadline {
                    return lost(error.to_string());
                }
            }
        }
        // A leader wakes at its deadline at the latest.
        let pause = if *leading.borrow() {
            config
                .retry_period
                .min((renewed_at + config.renew_deadline).saturating_duration_since(Instant::now()))
        } else {
            config.retry_period
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => break,
        }
    }
    if *leading.borrow() {
        release(&api, &config).await;
    }
    Ok(())
}

/// One round: Ok(true) when this candidate holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &ElectionConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(LEASE_NAME).await?;
    let now = Instant::now();
    let spec = current.as_ref().and_then(|l| l.spec.clone());
    let record = (
        spec.as_ref().and_then(|s| s.holder_identity.clone()),
        spec.as_ref()
            .and_then(|s| s.renew_time.as_ref().map(|t| t.0)),
    );
    let changed = observed
        .as_ref()
        .is_none_or(|o| (o.holder.clone(), o.renew_time) != record);
    if changed {
        *observed = Some(Observed {
            holder: record.0,
            renew_time: record.1,
            at: now,
        });
    }
    let since = observed.as_ref().map_or(now, |o| o.at);
    let decision = decide(
        spec.as_ref(),
        &config.identity,
        config.lease_duration,
        since,
        now,
        Timestamp::now(),
    );
    let Decision::Write(new_spec) = decision else {
        return Ok(false);
    };
    let write = async {
        match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(new_spec),
                };
                api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // The resourceVersion makes this a compare-and-swap: of two candidates, one wins.
                lease.spec = Some(new_spec);
                api.replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        }
    };
    write.await.map(|_| true)
}

/// Gives the Lease up at once: no holder, a one-second duration.
async fn release(api: &Api<Lease>, config: &ElectionConfig) {
    let released = async {
        let mut lease = api.get(LEASE_NAME).await?;
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(5), released).await {
        Ok(Ok(())) => tracing::info!(identity = %config.identity, "released the Lease"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "releasing the Lease failed; a standby takes over when it expires")
        }
        Err(_) => {
            tracing::warn!("releasing the Lease timed out; a standby takes over when it expires")
        }
    }
}

/// The namespace of the Lease by default: the pod's own (from its ServiceAccount), else
/// `default`.
pub fn default_lease_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|ns| ns.trim().to_owned())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// This process's candidate identity: the pod name (or host name) and a random suffix, so that
/// a restarted process never mistakes its predecessor's Lease for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "hookrelay".into());
    format!("{base}_{}", hex::encode(rand::random::<[u8; 4]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_lease_is_created_by_the_candidate() {
        let now = Instant::now();
        let Decision::Write(spec) = decide(None, "a", D, now, now, Timestamp::UNIX_EPOCH) else {
            panic!("should create");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn the_holder_renews_and_keeps_its_acquire_time() {
        let now = Instant::now();
        let mut current = held_by("a", 15);
        current.acquire_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        let wall = Timestamp::from_second(100).unwrap();
        let Decision::Write(spec) = decide(Some(&current), "a", D, now, now, wall) else {
            panic!("should renew");
        };
        assert_eq!(spec.renew_time, Some(MicroTime(wall)));
        assert_eq!(spec.acquire_time, current.acquire_time);
        assert_eq!(
            spec.lease_transitions,
            Some(3),
            "a renewal is no transition"
        );
    }

    #[test]
    fn another_holder_is_waited_out_for_its_duration_as_observed_here() {
        let seen = Instant::now();
        let current = held_by("b", 15);
        let wall = Timestamp::UNIX_EPOCH;
        // Its renewTime is ancient by the wall clock, but we have only just seen it change:
        // clock skew must not let us take it.
        assert_eq!(
            decide(
                Some(&current),
                "a",
                D,
                seen,
                seen + Duration::from_secs(14),
                wall
            ),
            Decision::Wait
        );
        let Decision::Write(spec) = decide(
            Some(&current),
            "a",
            D,
            seen,
            seen + Duration::from_secs(15),
            wall,
        ) else {
            panic!("should take over an expired lease");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(4));
    }

    #[test]
    fn the_written_duration_is_rounded_up() {
        let now = Instant::now();
        let d = Duration::from_millis(1500);
        let Decision::Write(spec) = decide(None, "a", d, now, now, Timestamp::UNIX_EPOCH) else {
            panic!("should create");
        };
        assert_eq!(spec.lease_duration_seconds, Some(2));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let seen = Instant::now();
        let mut released = held_by("b", 1);
        released.holder_identity = None;
        assert!(matches!(
            decide(Some(&released), "a", D, seen, seen, Timestamp::UNIX_EPOCH),
            Decision::Write(_)
        ));
        // An empty holder string is no holder either.
        released.holder_identity = Some(String::new());
        assert!(matches!(
            decide(Some(&released), "a", D, seen, seen, Timestamp::UNIX_EPOCH),
            Decision::Write(_)
        ));
    }

    #[test]
    fn identities_are_unique_per_process() {
        assert_ne!(identity(), identity());
    }
}
