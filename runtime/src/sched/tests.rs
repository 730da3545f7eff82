use proptest::prelude::*;

use super::sim::{self, Arrivals, SimConfig, SimTenant};
use super::*;

fn model(total_blocks: usize, max_sequences: usize, max_batch_tokens: usize) -> ModelParams {
    ModelParams {
        block_size: 4,
        total_blocks,
        swap_blocks: 0,
        swap_min_tokens: usize::MAX,
        disk_blocks: 0,
        disk_swap_min_tokens: usize::MAX,
        max_sequences,
        max_batch_tokens,
        price: 1.0,
        reserve_max_tokens: false,
    }
}

fn seq(key: SeqKey, tenant: &str, prompt_len: usize, max_tokens: usize) -> NewSeq {
    NewSeq {
        key,
        tenant: tenant.into(),
        params: TenantParams::default(),
        model: 0,
        prompt_len,
        max_tokens,
    }
}

/// Applies a plan as the engine would: every run entry is fed; a sequence samples when its
/// pending tokens are all fed. Returns the keys that sampled.
fn execute(s: &mut Scheduler, plan: &StepPlan, now: f64) -> Vec<SeqKey> {
    let mut sampled = Vec::new();
    for &(k, n) in &plan.run {
        let done = s.pending(k) == Some(n);
        s.advance(k, n, done, now);
        if done {
            sampled.push(k);
        }
    }
    sampled
}

/// Tokens held from the prefix cache count as computed, are never prefill work, and give back
/// what admission charged for them; after a preemption nothing is given back twice.
#[test]
fn cached_prompt_tokens_are_computed_already_and_cost_the_tenant_nothing() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(100, 8, 64));
    s.submit(seq(1, "a", 12, 4), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1]);
    let counter = |s: &mut Scheduler| s.report(0.0)[0].virtual_counter;
    assert_eq!(counter(&mut s), 12.0, "the whole prompt at admission");
    s.hold_cached(1, 8);
    assert_eq!(counter(&mut s), 4.0);
    assert_eq!(s.pending(1), Some(4));
    // The rest of the prompt, then the output.
    s.advance(1, 4, true, 0.0);
    for _ in 0..3 {
        s.advance(1, 1, true, 0.0);
    }
    let report = &s.report(0.0)[0];
    assert_eq!(report.stats.prefill_tokens, 4);
    assert_eq!(report.stats.cached_tokens, 8);
    assert_eq!(
        report.virtual_counter,
        4.0 + 3.0 * 2.0,
        "three decode tokens fed"
    );
    s.check_invariants().unwrap();
}

/// Blocks several sequences hold through the prefix cache count once against the pool and
/// the tenant's `kv_blocks`, as the engine reports them; a sharer that leaves takes its
/// discount with it, so the pool is never overcommitted.
#[test]
fn blocks_shared_through_the_prefix_cache_count_once() {
    // The pool binds: 11 blocks, three prompts of 4 blocks each.
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(11, 8, 64));
    for k in 1..=3 {
        s.submit(seq(k, "a", 15, 4), 0.0).unwrap();
    }
    assert_eq!(s.plan(0.0).admit, [1, 2]);
    assert!(s.plan(0.0).admit.is_empty(), "8 + 4 > 11");
    // 2 holds 3 of 1's blocks: 5 held, so 3 fits.
    s.set_sharing([(1, 0, 3), (2, 3, 3)]);
    assert_eq!(s.used_blocks(0), 5);
    assert_eq!(s.report(0.0)[0].kv_blocks, 5);
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [3]);
    s.check_plan(&plan).unwrap();
    // 1 leaves: 2 holds those blocks alone now, and they count for it.
    s.remove(1);
    assert_eq!(s.used_blocks(0), 8);
    s.check_invariants().unwrap();
    // A report that does not add up (a sequence borrowing from nobody, or from another
    // tenant's) discounts nothing; a fresh report replaces the last.
    s.set_sharing([(2, 100, 100)]);
    assert_eq!(s.used_blocks(0), 8);
    assert_eq!(s.borrowed(2), 0);
    s.set_sharing([(2, 3, 3), (3, 0, 3)]);
    assert_eq!(s.used_blocks(0), 5);
    s.set_sharing([]);
    assert_eq!(s.used_blocks(0), 8);
    s.check_invariants().unwrap();
    // Blocks are never shared across tenants: a report that says so discounts nothing.
    let mut two = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    two.add_model(model(100, 8, 64));
    two.submit(seq(1, "a", 15, 4), 0.0).unwrap();
    two.submit(seq(2, "b", 15, 4), 0.0).unwrap();
    assert_eq!(two.plan(0.0).admit.len(), 2);
    two.set_sharing([(1, 0, 3), (2, 3, 3)]);
    assert_eq!((two.used_blocks(0), two.borrowed(2)), (8, 0));

    // The tenant's quota binds likewise.
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 8, 64));
    for k in 1..=3 {
        let mut capped = seq(k, "a", 15, 4);
        capped.params.kv_blocks = Some(9);
        s.submit(capped, 0.0).unwrap();
    }
    assert_eq!(s.plan(0.0).admit, [1, 2]);
    assert!(s.plan(0.0).admit.is_empty(), "8 + 4 > 9");
    s.set_sharing([(1, 0, 3), (2, 3, 3)]);
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [3]);
    s.check_plan(&plan).unwrap();

    // Across a tenant's two classes (one cache scope): a batch sequence lends, an
    // interactive one borrows; when the lender leaves, the borrower's entry loses the
    // discount too, so the quota is not overrun.
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 8, 64));
    let capped = |k, class| {
        let mut n = seq(k, "a", 15, 4);
        n.params.kv_blocks = Some(9);
        n.params.class = class;
        n
    };
    s.submit(capped(1, PriorityClass::Batch), 0.0).unwrap();
    s.submit(capped(2, PriorityClass::Interactive), 0.0)
        .unwrap();
    s.plan(0.0);
    s.set_sharing([(1, 0, 3), (2, 3, 3)]);
    s.remove(1);
    s.submit(capped(3, PriorityClass::Interactive), 0.0)
        .unwrap();
    s.submit(capped(4, PriorityClass::Interactive), 0.0)
        .unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [3], "4 + 4 of 9; a third would make 12");
    s.check_plan(&plan).unwrap();
}

#[test]
fn blocks_are_committed_as_sequences_grow_not_for_max_tokens() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 8, 64));
    s.submit(seq(1, "a", 6, 90), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1]);
    assert_eq!(plan.run, [(1, 6)]);
    // 6 prompt tokens: 2 blocks of 4, not the 24 that prompt + max_tokens would reserve.
    assert_eq!(s.used_blocks(0), 2);
    execute(&mut s, &plan, 0.0);
    // The sampled token is the 7th: still 2 blocks; the 9th takes a third.
    assert_eq!(s.used_blocks(0), 2);
    for _ in 0..2 {
        let plan = s.plan(0.0);
        assert_eq!(plan.run, [(1, 1)]);
        execute(&mut s, &plan, 0.0);
    }
    assert_eq!(s.used_blocks(0), 3);
    s.remove(1);
    assert_eq!(s.used_blocks(0), 0);
    s.check_invariants().unwrap();
}

#[test]
fn requests_that_can_never_fit_are_rejected_naming_the_limit() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(10, 8, 64));
    let too_big = s.submit(seq(1, "a", 30, 20), 0.0).unwrap_err();
    assert_eq!(
        too_big,
        Reject::TooBigForModel {
            needed: 13,
            total: 10
        }
    );
    let mut quota = seq(2, "a", 8, 8);
    quota.params.kv_blocks = Some(3);
    let err = s.submit(quota, 0.0).unwrap_err();
    assert!(err.to_string().contains("limits.kv_blocks"), "{err}");
    let mut rate = seq(3, "a", 8, 1);
    rate.params.tokens_per_minute = Some(5);
    let err = s.submit(rate, 0.0).unwrap_err();
    assert!(
        err.to_string().contains("limits.tokens_per_minute"),
        "{err}"
    );
    assert!(s.is_empty());
}

#[test]
fn a_full_pool_preempts_the_latest_and_resumes_it_after() {
    for swap in [false, true] {
        let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
        let mut m = model(4, 8, 64);
        if swap {
            m.swap_blocks = 8;
            m.swap_min_tokens = 1;
        }
        s.add_model(m);
        // Two sequences of 4 prompt tokens (1 block each), each generating 8.
        s.submit(seq(1, "a", 4, 8), 0.0).unwrap();
        s.submit(seq(2, "a", 4, 8), 0.0).unwrap();
        let (preempted, generated) = run_out(&mut s, 8, |_| {});
        assert!(s.is_empty(), "both finish (swap {swap})");
        let kind = if swap {
            PreemptKind::Swap
        } else {
            PreemptKind::Recompute
        };
        // 12 tokens each need 3 blocks; two need 6 of 4: the later one yields.
        assert_eq!(preempted.first(), Some(&(2, kind)), "swap {swap}");
        assert_eq!(generated[&1], 8);
        assert_eq!(generated[&2], 8);
    }
}

/// Plans and runs steps (checking each plan and the invariants, `after_plan` looking at the
/// scheduler after each) until every sequence has generated `tokens` tokens and is removed, or
/// 100 steps pass; every preemption made on the way, and the tokens each sequence generated.
fn run_out(
    s: &mut Scheduler,
    tokens: usize,
    mut after_plan: impl FnMut(&mut Scheduler),
) -> (Vec<(SeqKey, PreemptKind)>, HashMap<SeqKey, usize>) {
    let mut preempted = Vec::new();
    let mut generated: HashMap<SeqKey, usize> = HashMap::new();
    for _ in 0..100 {
        let plan = s.plan(0.0);
        s.check_plan(&plan).unwrap();
        preempted.extend(plan.preempt.iter().copied());
        after_plan(s);
        for k in execute(s, &plan, 0.0) {
            let g = generated.entry(k).or_default();
            *g += 1;
            if *g == tokens {
                s.remove(k);
            }
        }
        s.check_invariants().unwrap();
        if s.is_empty() {
            break;
        }
    }
    (preempted, generated)
}

/// A tenant whose host tier is full (here: allowed none) has its preempted sequence
/// recomputed, while the model's swap space is free; without the limit it is swapped.
#[test]
fn a_tenant_at_its_host_tier_limit_is_recomputed_not_swapped() {
    for (limit, kind) in [(Some(0), PreemptKind::Recompute), (None, PreemptKind::Swap)] {
        let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
        let mut m = model(4, 8, 64);
        m.swap_blocks = 8;
        m.swap_min_tokens = 1;
        s.add_model(m);
        for key in [1, 2] {
            let mut n = seq(key, "a", 4, 8);
            n.params.host_kv_blocks = limit;
            s.submit(n, 0.0).unwrap();
        }
        let (preempted, _) = run_out(&mut s, 8, |s| {
            let host = s.report(0.0)[0].host_kv_blocks;
            assert!(limit.is_none_or(|l| host as u64 <= l), "{host} host blocks");
        });
        assert!(s.is_empty(), "both finish ({limit:?})");
        assert_eq!(preempted.first(), Some(&(2, kind)), "{limit:?}");
    }
}

/// Preemption goes down the tiers: to the host while it has room (model and tenant), then to
/// disk, then recompute; the disk tier has its own crossover and per-tenant limit, and a
/// sequence swapped back in comes from the tier it went to.
#[test]
fn a_preempted_sequence_goes_to_disk_when_the_host_tier_is_full() {
    let cases = [
        // (model swap_blocks, tenant host limit, model disk_blocks, tenant disk limit, disk
        // crossover): the first preemption's kind.
        ((8, None, 8, None, 1), PreemptKind::Swap),
        ((0, None, 8, None, 1), PreemptKind::SwapDisk),
        ((8, Some(0), 8, None, 1), PreemptKind::SwapDisk),
        ((8, Some(0), 8, Some(0), 1), PreemptKind::Recompute),
        ((8, Some(0), 0, None, 1), PreemptKind::Recompute),
        // Shorter than the disk tier's crossover: recomputing is cheaper.
        ((0, None, 8, None, 1000), PreemptKind::Recompute),
    ];
    for ((swap_blocks, host_limit, disk_blocks, disk_limit, disk_min), kind) in cases {
        let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
        let mut m = model(4, 8, 64);
        m.swap_blocks = swap_blocks;
        m.swap_min_tokens = 1;
        m.disk_blocks = disk_blocks;
        m.disk_swap_min_tokens = disk_min;
        s.add_model(m);
        for key in [1, 2] {
            let mut n = seq(key, "a", 4, 8);
            n.params.host_kv_blocks = host_limit;
            n.params.disk_kv_blocks = disk_limit;
            s.submit(n, 0.0).unwrap();
        }
        let mut peak_disk = 0;
        let (preempted, _) = run_out(&mut s, 8, |s| {
            peak_disk = peak_disk.max(s.report(0.0)[0].disk_kv_blocks);
        });
        let case = (swap_blocks, host_limit, disk_blocks, disk_limit, disk_min);
        assert!(s.is_empty(), "both finish ({case:?})");
        assert_eq!(preempted.first(), Some(&(2, kind)), "{case:?}");
        assert_eq!(
            peak_disk > 0,
            kind == PreemptKind::SwapDisk,
            "disk blocks held ({case:?})"
        );
        assert_eq!(s.report(0.0)[0].disk_kv_blocks, 0);
    }
}

/// A tenant's requests whose prompts the prefix cache holds go ahead of its earlier ones that
/// it does not hold, never needing more blocks than they would, and an earlier request is
/// passed over at most four times; another tenant's turn is untouched.
#[test]
fn a_resident_prefix_goes_first_within_its_tenant_only() {
    let order = |resident: &[(SeqKey, usize)], keys: &[SeqKey]| {
        let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
        s.add_model(model(100, 1, 64));
        for &k in keys {
            s.submit(seq(k, "a", 8, 1), 0.0).unwrap();
        }
        for &(k, tokens) in resident {
            s.note_resident(k, tokens);
        }
        let mut admitted = Vec::new();
        while !s.is_empty() {
            let plan = s.plan(0.0);
            s.check_plan(&plan).unwrap();
            admitted.extend(plan.admit.iter().copied());
            for k in execute(&mut s, &plan, 0.0) {
                s.remove(k);
            }
        }
        admitted
    };
    assert_eq!(order(&[], &[1, 2, 3]), [1, 2, 3], "no hint: arrival order");
    assert_eq!(order(&[(2, 4)], &[1, 2, 3]), [2, 1, 3]);
    // 1 is passed over four times, then goes.
    let all: Vec<SeqKey> = (1..=8).collect();
    let hints: Vec<(SeqKey, usize)> = (2..=8).map(|k| (k, 4)).collect();
    assert_eq!(order(&hints, &all), [2, 3, 4, 5, 1, 6, 7, 8]);

    // A resident request that needs more blocks than the earliest does not overtake it.
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 1, 64));
    s.submit(seq(1, "a", 8, 1), 0.0).unwrap();
    s.submit(seq(2, "a", 40, 1), 0.0).unwrap();
    s.note_resident(2, 32);
    assert_eq!(s.plan(0.0).admit, [1]);

    // Round robin between tenants holds: b's turn comes as it would.
    let mut s = Scheduler::new(PolicyKind::RoundRobin, Pricing::default());
    s.add_model(model(100, 1, 64));
    for (k, tenant) in [(1, "a"), (2, "b"), (3, "a")] {
        s.submit(seq(k, tenant, 8, 1), 0.0).unwrap();
    }
    s.note_resident(3, 4);
    let mut admitted = Vec::new();
    while !s.is_empty() {
        let plan = s.plan(0.0);
        admitted.extend(plan.admit.iter().copied());
        for k in execute(&mut s, &plan, 0.0) {
            s.remove(k);
        }
    }
    assert_eq!(
        admitted,
        [3, 2, 1],
        "a's resident request in a's turn, then b, then a"
    );
}

#[test]
fn a_tenants_kv_quota_holds_back_only_that_tenant() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 8, 64));
    let limited = |key| {
        let mut n = seq(key, "small", 8, 4);
        n.params.kv_blocks = Some(4);
        n
    };
    s.submit(limited(1), 0.0).unwrap();
    s.submit(limited(2), 0.0).unwrap();
    s.submit(seq(3, "big", 8, 4), 0.0).unwrap();
    let plan = s.plan(0.0);
    // small's two prompts hold 2 + 2 blocks: exactly its quota.
    assert_eq!(plan.admit, [1, 2, 3]);
    execute(&mut s, &plan, 0.0);
    // Each of small's sequences now holds a 9th token, a third block: over the quota, so its
    // later one is preempted; big is untouched.
    let plan = s.plan(0.0);
    assert_eq!(plan.preempt, [(2, PreemptKind::Recompute)]);
    let mut ran: Vec<SeqKey> = plan.run.iter().map(|&(k, _)| k).collect();
    ran.sort_unstable();
    assert_eq!(ran, [1, 3]);
    s.check_plan(&plan).unwrap();
}

#[test]
fn a_tenants_batch_work_yields_to_its_own_interactive_work_and_shares_its_quota() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(100, 2, 64));
    let of = |key, class| {
        let mut n = seq(key, "alpha", 8, 8);
        n.params.class = class;
        n.params.kv_blocks = Some(6);
        n
    };
    // A job's two lines fill the device's two places.
    s.submit(of(1, PriorityClass::Batch), 0.0).unwrap();
    s.submit(of(2, PriorityClass::Batch), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1, 2]);
    execute(&mut s, &plan, 0.0);
    // The same tenant's interactive request displaces one of them.
    s.submit(of(3, PriorityClass::Interactive), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.preempt, [(2, PreemptKind::Recompute)]);
    assert_eq!(plan.admit, [3]);
    s.check_plan(&plan).unwrap();
    execute(&mut s, &plan, 0.0);
    // Both classes count against one quota of 6 blocks: when their growth passes it, the
    // batch line is preempted, not the interactive request.
    let mut preempted = Vec::new();
    for _ in 0..8 {
        let plan = s.plan(0.0);
        s.check_plan(&plan).unwrap();
        preempted.extend(plan.preempt.iter().map(|&(k, _)| k));
        execute(&mut s, &plan, 0.0);
    }
    assert_eq!(preempted, [1]);
    let reports = s.report(0.0);
    let classes: Vec<(String, PriorityClass)> = reports
        .iter()
        .map(|r| (r.tenant.clone(), r.class))
        .collect();
    assert_eq!(
        classes,
        [
            ("alpha".to_owned(), PriorityClass::Batch),
            ("alpha".to_owned(), PriorityClass::Interactive)
        ]
    );
}

#[test]
fn an_interactive_request_that_cannot_start_preempts_none_of_its_batch_work() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(100, 4, 64));
    let of = |key, class, prompt| {
        let mut n = seq(key, "alpha", prompt, 4);
        n.params.class = class;
        n.params.kv_blocks = Some(12);
        n.params.tokens_per_minute = Some(45);
        n
    };
    // The batch line holds 10 of the quota's 12 blocks and 40 of the bucket's 45 tokens.
    s.submit(of(1, PriorityClass::Batch, 40), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1]);
    execute(&mut s, &plan, 0.0);
    // The interactive request's prompt does not fit the bucket: it waits, and the batch line
    // is not preempted for it (else it would be preempted and readmitted every plan).
    s.submit(of(2, PriorityClass::Interactive, 8), 0.0).unwrap();
    for _ in 0..3 {
        let plan = s.plan(0.0);
        assert!(plan.preempt.is_empty(), "{plan:?}");
        assert!(plan.admit.is_empty(), "{plan:?}");
        assert_eq!(plan.run, [(1, 1)]);
        s.check_plan(&plan).unwrap();
        execute(&mut s, &plan, 0.0);
    }
}

#[test]
fn the_token_bucket_delays_admission_and_refills() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 8, 64));
    let limited = |key| {
        let mut n = seq(key, "a", 40, 1);
        n.params.tokens_per_minute = Some(60); // one token a second
        n
    };
    s.submit(limited(1), 0.0).unwrap();
    s.submit(limited(2), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1], "the second prompt does not fit the bucket");
    execute(&mut s, &plan, 0.0);
    s.remove(1);
    assert!(s.plan(10.0).admit.is_empty());
    // 60 - 40 (prompt) - 1 (generated) = 19 left at 0 s, 29 at 10 s; 40 fit 21 s in.
    assert!((s.rate_wait("a", 10.0) - 11.0).abs() < 1e-9);
    assert!(s.plan(20.9).admit.is_empty());
    assert_eq!(s.plan(21.0).admit, [2]);
}

#[test]
fn interactive_work_preempts_batch_work_when_the_device_is_full() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(100, 2, 64));
    let batch = |key| {
        let mut n = seq(key, "batch", 4, 50);
        n.params.class = PriorityClass::Batch;
        n
    };
    s.submit(batch(1), 0.0).unwrap();
    s.submit(batch(2), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1, 2]);
    execute(&mut s, &plan, 0.0);
    s.submit(seq(3, "chat", 4, 5), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.preempt, [(2, PreemptKind::Recompute)]);
    assert_eq!(plan.admit, [3]);
    s.check_plan(&plan).unwrap();
    // Batch waits behind interactive work, and resumes when it is gone.
    s.submit(batch(4), 0.0).unwrap();
    execute(&mut s, &plan, 0.0);
    s.remove(3);
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [2], "the preempted batch sequence goes first");
}

#[test]
fn policies_order_admissions_their_own_way() {
    let order = |kind: PolicyKind| {
        let mut s = Scheduler::new(kind, Pricing::default());
        s.add_model(model(1000, 1, 64));
        // a sends three, then b one; b has weight 5.
        for (key, tenant) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let mut n = seq(key as SeqKey, tenant, 4, 1);
            n.params.weight = if tenant == "b" { 5 } else { 1 };
            s.submit(n, 0.0).unwrap();
        }
        let mut admitted = Vec::new();
        for _ in 0..20 {
            let plan = s.plan(0.0);
            admitted.extend(plan.admit.iter().copied());
            for k in execute(&mut s, &plan, 0.0) {
                s.remove(k);
            }
        }
        admitted
    };
    assert_eq!(order(PolicyKind::Fcfs), [0, 1, 2, 3]);
    assert_eq!(order(PolicyKind::RoundRobin), [0, 3, 1, 2]);
    assert_eq!(order(PolicyKind::Priority), [3, 0, 1, 2]);
    // Fair share: a is served first (tie, earlier), then b's counter (8 / 5) is below a's.
    assert_eq!(order(PolicyKind::FairShare), [0, 3, 1, 2]);
}

fn two_floods(wa: u32, wb: u32) -> (SimConfig, f64) {
    let tenants = vec![
        SimTenant::flood("a", wa, 48, 32),
        SimTenant::flood("b", wb, 96, 16),
    ];
    let bound = 2.0 * sim::largest_request_cost(&tenants, &Pricing::default());
    (SimConfig::new(tenants, 4000), bound)
}

#[test]
fn backlogged_tenants_stay_within_the_vtc_bound_at_every_step() {
    let (config, bound) = two_floods(1, 1);
    let r = sim::run(&config);
    let gap = r.max_weighted_gap(0, 1.0, 1, 1.0, 0);
    assert!(gap <= bound, "gap {gap} > bound {bound}");
    assert_eq!(r.idle_steps_with_work, 0);
    // Without fairness the request shapes decide: FCFS gives b's longer prompts more.
    let mut fcfs = config.clone();
    fcfs.policy = PolicyKind::Fcfs;
    fcfs.tenants[0].arrivals = Arrivals::Backlogged { outstanding: 4 };
    let r = sim::run(&fcfs);
    assert!(r.max_weighted_gap(0, 1.0, 1, 1.0, 0) > bound);
}

#[test]
fn weights_one_to_three_hold_over_every_window() {
    let (config, bound) = two_floods(1, 3);
    let r = sim::run(&config);
    let window_cost = 25.0 * bound; // 50 x the largest request's cost
    let warmup = 200;
    let mut start = warmup;
    let mut windows = 0;
    for end in warmup..r.service.len() {
        let a = r.service[end][0] - r.service[start][0];
        let b = r.service[end][1] - r.service[start][1];
        if a + b >= window_cost {
            let ratio = b / a;
            assert!(
                (ratio - 3.0).abs() <= 0.15,
                "steps {start}..{end}: service ratio {ratio:.3}, want 3 +- 5%"
            );
            windows += 1;
            start = end;
        }
    }
    assert!(windows >= 5, "{windows} windows");
    assert!(r.max_weighted_gap(0, 1.0, 1, 3.0, 0) <= bound);
}

#[test]
fn a_tenant_back_from_idle_gets_no_burst() {
    let (mut config, bound) = two_floods(1, 1);
    config.tenants[1].active = (20.0, f64::INFINITY);
    let r = sim::run(&config);
    let back = r.time.iter().position(|&t| t >= 20.0).unwrap();
    let (a0, b0) = (r.service[back][0], r.service[back][1]);
    for s in &r.service[back..] {
        let burst = (s[1] - b0) - (s[0] - a0);
        assert!(burst <= bound, "b got {burst} more than a after returning");
    }
    // And it does get its share once back.
    let last = r.service.last().unwrap();
    assert!(last[1] - b0 > 0.4 * (last[0] - a0 + last[1] - b0));
}

#[test]
fn a_flood_does_not_delay_another_tenants_first_token_beyond_the_bound() {
    let light = SimTenant {
        name: "light".into(),
        params: TenantParams::default(),
        arrivals: Arrivals::Poisson { per_second: 0.5 },
        prompt: (16, 32),
        output: (8, 8),
        max_tokens: None,
        active: (0.0, f64::INFINITY),
    };
    let alone = sim::run(&SimConfig::new(vec![light.clone()], 3000));
    let flood = SimTenant::flood("flood", 1, 64, 64);
    let config = SimConfig::new(vec![light, flood], 3000);
    let loaded = sim::run(&config);
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let unloaded = max(&alone.ttft[0]);
    // Admission waits at most for one slot to free: the longest request's steps.
    let step = config.cost.step_seconds + config.cost.token_seconds * 256.0;
    let allowance = (64.0 + 2.0) * step;
    assert!(loaded.ttft[0].len() > 20);
    assert!(
        max(&loaded.ttft[0]) <= unloaded + allowance,
        "light's worst TTFT {:.3}s under a flood vs {:.3}s alone",
        max(&loaded.ttft[0]),
        unloaded
    );
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        tenant: u8,
        prompt: usize,
        max_tokens: usize,
        class_batch: bool,
    },
    Step,
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 1usize..40, 1usize..40, any::<bool>()).prop_map(
            |(tenant, prompt, max_tokens, class_batch)| Op::Submit {
                tenant,
                prompt,
                max_tokens,
                class_batch
            }
        ),
        Just(Op::Step),
        Just(Op::Step),
        Just(Op::Step),
        (0usize..64).prop_map(Op::Cancel),
    ]
}

/// A stand-in for an engine's prefix cache, for the property test: every running sequence of
/// a tenant (either class) holds the same first [`SharedPrefixes::BLOCKS`] blocks, as if all
/// its prompts began with one cached system prompt.
struct SharedPrefixes {
    /// What the engine would tell the scheduler: per sequence, blocks an earlier one (a lower
    /// key) holds too, and blocks any other holds.
    report: Vec<(SeqKey, usize, usize)>,
    /// Device blocks truly held, a block several hold counted once: on the model, and per
    /// tenant name.
    model: usize,
    tenants: HashMap<String, usize>,
}

impl SharedPrefixes {
    const BLOCKS: usize = 2;

    fn of(s: &Scheduler) -> Self {
        let mut holders: HashMap<(&str, usize), Vec<SeqKey>> = HashMap::new();
        let mut tenants: HashMap<String, usize> = HashMap::new();
        let mut model = 0;
        for k in &s.running {
            let seq = &s.seqs[k];
            let name = s.tenants[seq.tenant].name.as_str();
            for j in 0..Self::BLOCKS.min(seq.blocks) {
                holders.entry((name, j)).or_default().push(*k);
            }
            model += seq.blocks;
            *tenants.entry(name.to_owned()).or_default() += seq.blocks;
        }
        for ((name, _), keys) in &holders {
            model -= keys.len() - 1;
            if let Some(held) = tenants.get_mut(*name) {
                *held -= keys.len() - 1;
            }
        }
        let report = s
            .running
            .iter()
            .map(|k| {
                let name = s.tenants[s.seqs[k].tenant].name.as_str();
                let (mut borrowed, mut sharing) = (0, 0);
                for j in 0..Self::BLOCKS {
                    if let Some(keys) = holders
                        .get(&(name, j))
                        .filter(|ks| ks.len() >= 2 && ks.contains(k))
                    {
                        sharing += 1;
                        if keys.iter().min() != Some(k) {
                            borrowed += 1;
                        }
                    }
                }
                (*k, borrowed, sharing)
            })
            .filter(|&(_, _, sharing)| sharing > 0)
            .collect();
        Self {
            report,
            model,
            tenants,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Under any mix of arrivals, cancellations, quotas, policies and preemption: no pool or
    /// quota is ever over after a plan, nothing idles while work could run, and everything
    /// admitted finishes once arrivals stop.
    #[test]
    fn plans_respect_every_limit_and_everything_finishes(
        ops in prop::collection::vec(op(), 1..120),
        policy in prop_oneof![Just(PolicyKind::Fcfs), Just(PolicyKind::RoundRobin), Just(PolicyKind::Priority), Just(PolicyKind::FairShare)],
        total_blocks in 20usize..60,
        swap_blocks in 0usize..30,
        disk_blocks in prop_oneof![Just(0usize), 0usize..40],
        max_sequences in 1usize..6,
        max_batch_tokens in 1usize..48,
        quota in prop::option::of(20u64..40),
        share_prefixes in any::<bool>(),
    ) {
        let mut s = Scheduler::new(policy, Pricing::default());
        s.add_model(ModelParams {
            block_size: 4,
            total_blocks,
            swap_blocks,
            swap_min_tokens: 6,
            disk_blocks,
            disk_swap_min_tokens: 10,
            max_sequences,
            max_batch_tokens,
            price: 1.0,
            reserve_max_tokens: false,
        });
        let mut live: Vec<(SeqKey, usize)> = Vec::new(); // key, tokens still to generate
        let mut next = 0;
        let step = |s: &mut Scheduler, live: &mut Vec<(SeqKey, usize)>| -> Result<(), TestCaseError> {
            let plan = s.plan(0.0);
            s.check_plan(&plan).map_err(TestCaseError::fail)?;
            // With blocks shared (and counted once), what the device and each tenant truly
            // hold after the plan stays within the pool and the quota.
            if share_prefixes {
                let truth = SharedPrefixes::of(s);
                prop_assert!(truth.model <= total_blocks, "{} blocks held of {total_blocks}", truth.model);
                if let Some(q) = quota {
                    for (name, held) in &truth.tenants {
                        let capped = name[1..].parse::<u8>().is_ok_and(|t| t % 2 == 0);
                        prop_assert!(!capped || *held as u64 <= q, "{name} holds {held} of {q}");
                    }
                }
            }
            if plan.run.is_empty() {
                prop_assert!(s.is_empty(), "idle with {} sequences", s.len());
            }
            for k in execute(s, &plan, 0.0) {
                if let Some(i) = live.iter().position(|&(key, _)| key == k) {
                    live[i].1 -= 1;
                    if live[i].1 == 0 {
                        s.remove(k);
                        live.swap_remove(i);
                    }
                }
            }
            if share_prefixes {
                s.set_sharing(SharedPrefixes::of(s).report);
            }
            s.check_invariants().map_err(TestCaseError::fail)?;
            Ok(())
        };
        for op in ops {
            match op {
                Op::Submit { tenant, prompt, max_tokens, class_batch } => {
                    let mut n = seq(next, &format!("t{tenant}"), prompt, max_tokens);
                    n.params.weight = u32::from(tenant) + 1;
                    n.params.kv_blocks = quota.filter(|_| tenant % 2 == 0);
                    n.params.host_kv_blocks = quota.map(|q| q / 4).filter(|_| tenant % 3 == 1);
                    n.params.disk_kv_blocks = quota.map(|q| q / 3).filter(|_| tenant % 3 == 2);
                    if class_batch {
                        n.params.class = PriorityClass::Batch;
                    }
                    if s.submit(n, 0.0).is_ok() {
                        live.push((next, max_tokens));
                        s.note_resident(next, (prompt % 3) * 4);
                    }
                    next += 1;
                }
                Op::Step => step(&mut s, &mut live)?,
                Op::Cancel(i) => {
                    if !live.is_empty() {
                        let (k, _) = live.swap_remove(i % live.len());
                        s.remove(k);
                    }
                }
            }
        }
        for _ in 0..10_000 {
            if s.is_empty() {
                break;
            }
            step(&mut s, &mut live)?;
        }
        prop_assert!(s.is_empty(), "{} sequences never finished", s.len());
    }
}

#[test]
fn on_demand_blocks_hold_more_live_tokens_than_reservation() {
    eprintln!("{}", sim::utilisation_report());
    let (reserved, on_demand) = (sim::utilisation(true), sim::utilisation(false));
    assert!(
        on_demand.block_utilisation() > reserved.block_utilisation() + 0.2,
        "utilisation {} vs {}",
        on_demand.block_utilisation(),
        reserved.block_utilisation()
    );
    assert!(on_demand.throughput() > reserved.throughput());
}

#[test]
fn a_reload_that_lowers_a_quota_rejects_what_can_no_longer_run() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 1, 64));
    s.submit(seq(1, "a", 8, 30), 0.0).unwrap();
    s.submit(seq(2, "a", 8, 30), 0.0).unwrap();
    assert_eq!(s.plan(0.0).admit, [1]);
    // A new request carries the reloaded policy: 4 blocks of 4 tokens.
    let mut third = seq(3, "a", 4, 4);
    third.params.kv_blocks = Some(4);
    s.submit(third, 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.reject.len(), 1, "{plan:?}");
    assert_eq!(plan.reject[0].0, 2);
    assert!(plan.reject[0].1.to_string().contains("limits.kv_blocks"));
    s.check_plan(&plan).unwrap();
}

#[test]
fn batch_work_is_not_preempted_when_that_cannot_make_room() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(10, 8, 64));
    let mut batch = seq(1, "bulk", 4, 4);
    batch.params.class = PriorityClass::Batch;
    s.submit(batch, 0.0).unwrap();
    s.submit(seq(2, "chat", 32, 4), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [2, 1]);
    // 8 + 1 of 10 blocks are held; another 8-block interactive request would not fit even
    // with the batch sequence gone, so the batch sequence is left alone.
    s.submit(seq(3, "chat2", 29, 4), 0.0).unwrap();
    let plan = s.plan(0.0);
    assert!(plan.preempt.is_empty(), "{plan:?}");
}

#[test]
fn weights_hold_across_models_that_share_a_device() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    s.add_model(model(1000, 4, 64));
    s.add_model(model(1000, 4, 64));
    let mut key = 0;
    let mut generated = [0u64; 2];
    let mut outstanding = [0usize; 2];
    let mut owner: HashMap<SeqKey, (usize, usize)> = HashMap::new();
    for _ in 0..3000 {
        // Tenant a floods model 0 (weight 1); tenant b floods model 1 (weight 3).
        for t in 0..2 {
            while outstanding[t] < 8 {
                let mut n = seq(key, ["a", "b"][t], 8, 24);
                n.model = t;
                n.params.weight = [1, 3][t];
                s.submit(n, 0.0).unwrap();
                owner.insert(key, (t, 0));
                outstanding[t] += 1;
                key += 1;
            }
        }
        let plan = s.plan(0.0);
        s.check_plan(&plan).unwrap();
        let models: std::collections::HashSet<usize> =
            plan.run.iter().map(|(k, _)| owner[k].0).collect();
        assert_eq!(models.len(), 1, "one model steps at a time");
        for k in execute(&mut s, &plan, 0.0) {
            let (t, g) = owner.get_mut(&k).unwrap();
            generated[*t] += 1;
            *g += 1;
            if *g == 24 {
                let t = *t;
                s.remove(k);
                owner.remove(&k);
                outstanding[t] -= 1;
            }
        }
    }
    let ratio = generated[1] as f64 / generated[0] as f64;
    assert!(
        (ratio - 3.0).abs() < 0.15,
        "b:a = {ratio:.3} ({generated:?})"
    );
}

#[test]
fn a_full_model_holds_back_only_requests_for_it() {
    let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default());
    s.add_model(model(100, 1, 64));
    s.add_model(model(100, 1, 64));
    s.submit(seq(1, "a", 4, 8), 0.0).unwrap();
    s.submit(seq(2, "a", 4, 8), 0.0).unwrap();
    let mut other = seq(3, "a", 4, 8);
    other.model = 1;
    s.submit(other, 0.0).unwrap();
    // Model 0 has one slot: 2 waits, but 3 (behind it in arrival, for model 1) starts.
    let plan = s.plan(0.0);
    assert_eq!(plan.admit, [1, 3]);
}

#[test]
fn token_buckets_are_shared_between_devices() {
    let buckets = Buckets::default();
    let mut devices: Vec<Scheduler> = (0..2)
        .map(|_| {
            let mut s = Scheduler::new(PolicyKind::Fcfs, Pricing::default())
                .with_buckets(std::sync::Arc::clone(&buckets));
            s.add_model(model(100, 8, 64));
            s
        })
        .collect();
    for (i, s) in devices.iter_mut().enumerate() {
        let mut n = seq(i as SeqKey, "a", 40, 1);
        n.params.tokens_per_minute = Some(60);
        s.submit(n, 0.0).unwrap();
    }
    // 60 tokens a minute: the first device's 40-token prompt leaves 20, too few for the
    // second device's.
    assert_eq!(devices[0].plan(0.0).admit, [0]);
    assert!(devices[1].plan(0.0).admit.is_empty());
    assert_eq!(devices[1].plan(20.0).admit, [1]);
}

#[test]
fn a_retired_model_takes_nothing_new_and_its_index_goes_to_the_next_model() {
    let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    assert_eq!(s.add_model(model(64, 8, 64)), 0);
    assert_eq!(s.add_model(model(64, 8, 64)), 1);
    s.submit(seq(1, "a", 4, 8), 0.0).unwrap();
    s.submit(
        NewSeq {
            model: 1,
            ..seq(2, "b", 4, 8)
        },
        0.0,
    )
    .unwrap();
    let plan = s.plan(0.0);
    execute(&mut s, &plan, 0.0);
    // A model with a sequence cannot go: the runner ends its requests first.
    assert_eq!(s.retire_model(1), Err(1));
    assert!(s.has_model(1));
    s.remove(2);
    assert_eq!(s.retire_model(1), Ok(()));
    assert!(!s.has_model(1));
    assert_eq!(
        s.submit(
            NewSeq {
                model: 1,
                ..seq(3, "b", 4, 8)
            },
            0.0
        ),
        Err(Reject::UnknownModel(1))
    );
    s.check_invariants().unwrap();
    // The other model's sequence runs on, untouched.
    for _ in 0..10 {
        let plan = s.plan(0.0);
        s.check_plan(&plan).unwrap();
        assert!(plan.run.iter().all(|&(k, _)| k == 1), "{plan:?}");
        assert!(!plan.run.is_empty());
        execute(&mut s, &plan, 0.0);
    }
    // The next model placed takes the retired index and starts empty.
    assert_eq!(s.add_model(model(32, 4, 64)), 1);
    assert_eq!(s.used_blocks(1), 0);
    s.submit(
        NewSeq {
            model: 1,
            ..seq(4, "b", 4, 8)
        },
        0.0,
    )
    .unwrap();
    let plan = s.plan(0.0);
    s.check_plan(&plan).unwrap();
    assert!(plan.admit.contains(&4), "{plan:?}");
    assert_eq!(s.add_model(model(32, 4, 64)), 2, "no retired index is left");
}
