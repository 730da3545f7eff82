//! Scheduling policies: the order in which tenants' waiting work is admitted and whose running
//! work is preempted first. One trait, one implementation per policy, chosen by
//! [`PolicyKind`] from the daemon config.
//!
//! A policy only ranks tenants; the scheduler owns the counters, queues and quotas it ranks
//! by. Classes (`interactive` before `batch`) are applied by the scheduler above every policy.

use serde::{Deserialize, Serialize};

/// What a policy may look at when ranking a tenant.
#[derive(Debug, Clone, Copy)]
pub struct TenantView {
    /// The tenant's weight from the policy (at least 1).
    pub weight: u32,
    /// Weighted service received so far (virtual token counter).
    pub counter: f64,
    /// Requests admitted so far, lifted like the counter (round-robin turns).
    pub turns: f64,
    /// Arrival number of the tenant's oldest waiting request (`u64::MAX` when none).
    pub head_arrival: u64,
}

/// Orders tenants for admission: the tenant with the smallest key is served first; the one
/// with the largest key is preempted first.
pub trait SchedulingPolicy: Send + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// The tenant's rank; ties break on the second component (earlier arrival first).
    fn key(&self, tenant: &TenantView) -> (f64, u64);
}

/// The policies a daemon can run, as named in its config (`scheduler.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// First come, first served across every tenant.
    Fcfs,
    /// Tenants take turns: one admitted request each, in rotation.
    RoundRobin,
    /// Strict priority: a tenant's `weight` is its priority; higher always goes first.
    Priority,
    /// Weighted fair share by virtual token counters (OSDI'24 VTC).
    #[default]
    FairShare,
}

impl PolicyKind {
    pub fn build(self) -> Box<dyn SchedulingPolicy> {
        match self {
            PolicyKind::Fcfs => Box::new(Fcfs),
            PolicyKind::RoundRobin => Box::new(RoundRobin),
            PolicyKind::Priority => Box::new(Priority),
            PolicyKind::FairShare => Box::new(FairShare),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Fcfs => "fcfs",
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Priority => "priority",
            PolicyKind::FairShare => "fair_share",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &'static str {
        "fcfs"
    }
    fn key(&self, t: &TenantView) -> (f64, u64) {
        (0.0, t.head_arrival)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RoundRobin;

impl SchedulingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }
    fn key(&self, t: &TenantView) -> (f64, u64) {
        (t.turns, t.head_arrival)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Priority;

impl SchedulingPolicy for Priority {
    fn name(&self) -> &'static str {
        "priority"
    }
    fn key(&self, t: &TenantView) -> (f64, u64) {
        (-f64::from(t.weight), t.head_arrival)
    }
}

/// Virtual token counters: each tenant's counter grows by the price of the tokens it is served
/// divided by its weight; the smallest counter goes next. Between two backlogged tenants the
/// gap stays within twice the largest request's cost (Sheng et al., OSDI'24).
#[derive(Debug, Clone, Copy)]
pub struct FairShare;

impl SchedulingPolicy for FairShare {
    fn name(&self) -> &'static str {
        "fair_share"
    }
    fn key(&self, t: &TenantView) -> (f64, u64) {
        (t.counter, t.head_arrival)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(weight: u32, counter: f64, turns: f64, head_arrival: u64) -> TenantView {
        TenantView {
            weight,
            counter,
            turns,
            head_arrival,
        }
    }

    #[test]
    fn each_policy_ranks_by_its_own_measure() {
        let early_heavy = view(1, 100.0, 5.0, 1);
        let late_light = view(3, 10.0, 2.0, 9);
        let ranks = |p: &dyn SchedulingPolicy| p.key(&early_heavy) < p.key(&late_light);
        assert!(ranks(&Fcfs), "fcfs: earliest arrival first");
        assert!(!ranks(&RoundRobin), "round robin: fewest turns first");
        assert!(!ranks(&Priority), "priority: highest weight first");
        assert!(!ranks(&FairShare), "fair share: smallest counter first");
        let names: Vec<&str> = [
            PolicyKind::Fcfs,
            PolicyKind::RoundRobin,
            PolicyKind::Priority,
            PolicyKind::FairShare,
        ]
        .iter()
        .map(|k| {
            assert_eq!(k.build().name(), k.as_str());
            k.as_str()
        })
        .collect();
        assert_eq!(names, ["fcfs", "round_robin", "priority", "fair_share"]);
    }
}
