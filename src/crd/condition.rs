//! `metav1.Condition` handling shared by both resources.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition as the reconciler decides it; times and generation are filled in on merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl ConditionState {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `new` into `conditions`. `lastTransitionTime` moves only when the status flips, so a
/// reason or message change is not reported as a transition. Returns true when the status flipped
/// (or the condition is new): the moment worth a Kubernetes Event.
pub fn merge_condition(
    conditions: &mut Vec<Condition>,
    new: &ConditionState,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if new.status { "True" } else { "False" };
    let existing = conditions.iter_mut().find(|c| c.type_ == new.type_);
    let flipped = existing.as_ref().is_none_or(|c| c.status != status);
    let last_transition_time = match &existing {
        Some(c) if !flipped => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: new.type_.to_owned(),
        status: status.to_owned(),
        reason: new.reason.clone(),
        message: new.message.clone(),
        observed_generation: generation,
        last_transition_time,
    };
    match existing {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
    flipped
}

/// Whether the condition of this type is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        let not_ready = ConditionState::new("Ready", false, "SecretNotFound", "secret a not found");
        assert!(merge_condition(&mut conds, &not_ready, Some(1), ts(100)));
        assert_eq!(conds[0].last_transition_time, Time(ts(100)));

        // Same status, other reason: no transition, time kept, reason updated.
        let other = ConditionState::new("Ready", false, "SecretKeyNotFound", "key b missing");
        assert!(!merge_condition(&mut conds, &other, Some(2), ts(200)));
        assert_eq!(conds[0].last_transition_time, Time(ts(100)));
        assert_eq!(conds[0].reason, "SecretKeyNotFound");
        assert_eq!(conds[0].observed_generation, Some(2));

        let ready = ConditionState::new("Ready", true, "Ready", "routing");
        assert!(merge_condition(&mut conds, &ready, Some(2), ts(300)));
        assert_eq!(conds[0].last_transition_time, Time(ts(300)));
        assert!(is_true(&conds, "Ready"));
        assert_eq!(conds.len(), 1);
    }
}
