//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it.
//!
//! Every replica serves the REST API, ingest and the shared JetStream work, and keeps its
//! routing table warm; only the leader runs what needs one writer: the DocumentEvent
//! controller, status and Event writes, and the JetStream serial lane (rate limits, ordering).
//! A candidate takes the Lease when it is free or when its record has not changed for
//! `lease_duration` *as observed locally* (so clock skew between replicas does not matter),
//! renews it every `retry_period`, and **steps down** when it could not renew within
//! `renew_deadline`: what it ran as the leader is stopped (see [`LeaderTerms`]) while the rest of
//! the process keeps working, and it campaigns again as soon as the API server answers. An
//! outage of any length costs no restart.
//!
//! Leadership is also fenced by time: a leader's term ends at its last renewal plus the renew
//! deadline, by this process's monotonic clock, whether or not the election task has run since.
//! A process paused past that (SIGSTOP, a frozen VM) is no leader the moment it wakes, before
//! any of its tasks can write status or send a DocumentEvent's attempt.
//!
//! On shutdown the leader releases the Lease once its status is written, so that a standby
//! takes over at its next retry instead of waiting out the lease duration.
//!
//! [`decide`] is the pure core (what to write, given the Lease and what was observed); the loop
//! around it only talks to the API server.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
// Tokio's clock is the monotonic clock, and tests can pause it.
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

/// The Lease's name.
pub const LEASE_NAME: &str = "hookrelay";

/// When the current term ends unless renewed; None: no term (or, without an election, no end).
type TermEnd = Arc<Mutex<Option<Instant>>>;

/// Whether this replica leads now. Without leader election it always does.
#[derive(Clone, Debug)]
pub struct Leadership {
    leads: watch::Receiver<bool>,
    /// Elected leadership only: the end of the current term (see the module's "fenced by time").
    ends: Option<TermEnd>,
    /// Another replica held the Lease, unexpired, when it was last read.
    others: Arc<AtomicBool>,
}

/// The election's side of a [`Leadership`]: starts and ends terms.
#[derive(Debug)]
pub struct Terms {
    leads: watch::Sender<bool>,
    ends: TermEnd,
    others: Arc<AtomicBool>,
}

impl Terms {
    /// A new term, or the current one renewed: leading until `until`.
    fn lead_until(&self, until: Instant) {
        self.others.store(false, AtomicOrdering::Relaxed);
        *lock(&self.ends) = Some(until);
        self.leads
            .send_if_modified(|leads| !std::mem::replace(leads, true));
    }

    /// What the last read of the Lease said of the other replicas: one of them holds it.
    fn another_holds(&self, holds: bool) {
        self.others.store(holds, AtomicOrdering::Relaxed);
    }

    /// The term ends now; everything that acts as the leader is told to stop.
    fn step_down(&self) {
        *lock(&self.ends) = None;
        self.leads.send_replace(false);
    }

    fn leads(&self) -> bool {
        *self.leads.borrow()
    }
}

fn lock(ends: &TermEnd) -> std::sync::MutexGuard<'_, Option<Instant>> {
    ends.lock().unwrap_or_else(|e| e.into_inner())
}

impl From<watch::Receiver<bool>> for Leadership {
    /// Leadership that follows a flag alone, with no term end.
    fn from(leads: watch::Receiver<bool>) -> Self {
        Self {
            leads,
            ends: None,
            others: Arc::default(),
        }
    }
}

impl Leadership {
    /// A replica that leads from the start and never stops (no `--leader-elect`).
    pub fn always() -> Self {
        Self {
            leads: watch::Sender::new(true).subscribe(),
            ends: None,
            others: Arc::default(),
        }
    }

    /// Leadership decided by an election ([`run`] drives the returned [`Terms`]).
    pub fn elected() -> (Terms, Self) {
        let (leads, rx) = watch::channel(false);
        let ends = TermEnd::default();
        let others = Arc::<AtomicBool>::default();
        let leadership = Self {
            leads: rx,
            ends: Some(ends.clone()),
            others: others.clone(),
        };
        (
            Terms {
                leads,
                ends,
                others,
            },
            leadership,
        )
    }

    /// A standby that has read the Lease held by another replica (for tests).
    #[cfg(test)]
    pub(crate) fn standby_of_another() -> Self {
        let (terms, leadership) = Self::elected();
        terms.another_holds(true);
        std::mem::forget(terms);
        leadership
    }

    /// Leads now: the election says so and the term has not run out by this process's clock.
    pub fn is_leader(&self) -> bool {
        *self.leads.borrow() && self.term_end().is_none_or(|end| Instant::now() < end)
    }

    /// Another replica is known to lead: it held the Lease, unexpired, when this replica last
    /// read it. False while nothing is known (no Lease read yet, or none since this replica
    /// stepped down because the API server did not answer): work that any replica may do, but
    /// that the leader should do when there is one (direct ingest, manual deliveries), goes on
    /// here then.
    pub fn another_leads(&self) -> bool {
        !self.is_leader() && self.others.load(AtomicOrdering::Relaxed)
    }

    fn term_end(&self) -> Option<Instant> {
        let ends = self.ends.as_ref()?;
        // Elected and leading with no end set cannot happen (lead_until sets it first); treat
        // it as ended.
        Some(lock(ends).unwrap_or_else(Instant::now))
    }

    /// Waits until this replica leads; false when it never will (the election ended).
    pub async fn acquired(&mut self) -> bool {
        loop {
            if self.leads.wait_for(|leads| *leads).await.is_err() {
                return false;
            }
            if self.is_leader() {
                return true;
            }
            // Flagged but already past its end: the election will step down or renew.
            if self.leads.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Resolves once this replica no longer leads: the election stepped down, or the term ran
    /// out without a renewal (the election task may not have run: see "fenced by time").
    pub async fn lost(&mut self) {
        loop {
            if !self.is_leader() {
                return;
            }
            let end = self.term_end();
            tokio::select! {
                changed = self.leads.changed() => if changed.is_err() {
                    // Nothing changes the flag any more (no election, or it has ended at
                    // shutdown): leadership ends with the term, if it has an end at all.
                    match end {
                        Some(end) => tokio::time::sleep_until(end).await,
                        None => std::future::pending().await,
                    }
                    return;
                },
                _ = async {
                    match end {
                        Some(end) => tokio::time::sleep_until(end).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Waits for the next change; false once it can no longer change.
    pub async fn changed(&mut self) -> bool {
        self.leads.changed().await.is_ok()
    }
}

/// Runs leader-only work once per term of leadership: what needs one writer never runs on two
/// replicas, nor twice in one.
///
/// ```ignore
/// let mut terms = LeaderTerms::new(leadership, shutdown);
/// while let Some(()) = terms.during_term(|term| controller.run(term)).await {}
/// ```
pub struct LeaderTerms {
    leadership: Leadership,
    shutdown: CancellationToken,
}

impl LeaderTerms {
    pub fn new(leadership: Leadership, shutdown: CancellationToken) -> Self {
        Self {
            leadership,
            shutdown,
        }
    }

    /// Waits until this replica leads, then runs `work` with a token that is cancelled the
    /// moment the term ends (or `shutdown` fires), and returns what it returned once it has
    /// stopped. None, without running it, when `shutdown` fires first.
    pub async fn during_term<T, F: Future<Output = T>>(
        &mut self,
        work: impl FnOnce(CancellationToken) -> F,
    ) -> Option<T> {
        tokio::select! {
            leads = self.leadership.acquired() => if !leads {
                return None;
            },
            _ = self.shutdown.cancelled() => return None,
        }
        if self.shutdown.is_cancelled() {
            return None;
        }
        let term = self.shutdown.child_token();
        let run = work(term.clone());
        tokio::pin!(run);
        let output = tokio::select! {
            output = &mut run => output,
            _ = self.leadership.lost() => {
                if !self.shutdown.is_cancelled() {
                    tracing::warn!("the term ended: leader-only work stops (ingest and shared work go on)");
                }
                term.cancel();
                run.await
            }
        };
        Some(output)
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

/// Runs the election until `stop` fires, then releases the Lease if held. Losing the Lease
/// (not renewed within the renew deadline, or taken by another replica) ends the term
/// ([`Terms`]) and the candidate campaigns again: it never ends the process.
pub async fn run(client: Client, config: ElectionConfig, terms: Terms, stop: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    // While leading: when the last successful renewal *started*. The API server's record is at
    // least that recent, so a standby cannot take over before this + lease duration; the term
    // ends at this + renew deadline, which is earlier.
    let mut renewed_at = Instant::now();
    let round_timeout = config.retry_period.max(Duration::from_secs(1));
    let lease = format!("{}/{LEASE_NAME}", config.namespace);
    let step_down = |why: &str| {
        terms.step_down();
        tracing::warn!(identity = %config.identity, %lease, why, deadline = ?config.renew_deadline, "leadership lost; stepping down and campaigning again");
    };
    loop {
        let started = Instant::now();
        let deadline = renewed_at + config.renew_deadline;
        if terms.leads() && started >= deadline {
            // Nobody is known to lead now: this replica could not reach the Lease.
            terms.another_holds(false);
            step_down("the Lease could not be renewed within the renew deadline");
        }
        let leads = terms.leads();
        // A leader's round never outlives its term.
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
                    tracing::info!(identity = %config.identity, %lease, "became the leader");
                }
                terms.lead_until(started + config.renew_deadline);
            }
            Ok(false) if leads => {
                terms.another_holds(true);
                step_down("another replica holds the Lease");
            }
            Ok(false) => terms.another_holds(true),
            // Another candidate wrote the Lease first: normal for a candidate, worth a retry
            // (until the renew deadline) for the leader.
            Err(kube::Error::Api(e)) if e.code == 409 && !leads => {}
            Err(error) => {
                tracing::warn!(%error, "leader election: cannot read or write the Lease");
                if leads && Instant::now() >= deadline {
                    terms.another_holds(false);
                    step_down(&error.to_string());
                }
            }
        }
        // A leader wakes at its deadline at the latest.
        let pause = if terms.leads() {
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
    if terms.leads() {
        release(&api, &config).await;
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_term_ends_at_its_deadline_even_if_the_election_never_runs_again() {
        let (terms, leadership) = Leadership::elected();
        assert!(!leadership.is_leader());
        terms.lead_until(Instant::now() + Duration::from_secs(10));
        assert!(leadership.is_leader());
        // A paused process wakes past its term: no leader, before any step-down is sent.
        let mut lost = leadership.clone();
        let started = tokio::time::Instant::now();
        lost.lost().await;
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(!leadership.is_leader());
        assert!(terms.leads(), "the flag alone still says leading");
    }

    #[tokio::test(start_paused = true)]
    async fn leader_work_stops_when_the_term_ends_and_runs_again_in_the_next() {
        let (terms, leadership) = Leadership::elected();
        let shutdown = CancellationToken::new();
        let (ran, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut leader_terms = LeaderTerms::new(leadership, shutdown.clone());
        let worker = tokio::spawn(async move {
            let mut n = 0;
            while let Some(()) = leader_terms
                .during_term(|term| {
                    n += 1;
                    let ran = ran.clone();
                    let n = n;
                    async move {
                        ran.send(("started", n)).unwrap();
                        term.cancelled().await;
                        ran.send(("stopped", n)).unwrap();
                    }
                })
                .await
            {}
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            runs.try_recv().is_err(),
            "nothing runs before the first term"
        );
        terms.lead_until(Instant::now() + Duration::from_secs(5));
        assert_eq!(runs.recv().await, Some(("started", 1)));
        // Renewed: the same run goes on.
        tokio::time::sleep(Duration::from_secs(3)).await;
        terms.lead_until(Instant::now() + Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(runs.try_recv().is_err(), "a renewal is no new term");
        // Stepped down: the run stops, and a new term starts a new one.
        terms.step_down();
        assert_eq!(runs.recv().await, Some(("stopped", 1)));
        terms.lead_until(Instant::now() + Duration::from_secs(5));
        assert_eq!(runs.recv().await, Some(("started", 2)));
        // Not renewed: the term runs out by the clock alone.
        assert_eq!(runs.recv().await, Some(("stopped", 2)));
        shutdown.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_without_an_election_never_ends() {
        let mut leadership = Leadership::always();
        let lost = tokio::time::timeout(Duration::from_secs(3600), leadership.lost()).await;
        assert!(lost.is_err(), "an unelected replica lost its leadership");
        assert!(leadership.is_leader());
    }

    #[test]
    fn identities_are_unique_per_process() {
        assert_ne!(identity(), identity());
    }
}
