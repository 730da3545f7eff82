use super::*;
use crate::config::PreemptionMode;
use crate::sched::PolicyKind;

/// A tenant whose requests panic while the device loop takes them in.
pub(super) const PANIC_IN_ACCEPT: &str = "panics-in-accept";

/// A device loop as the daemon builds it: engines behind the ops trait.
type Loop = Arbiter<Box<dyn crate::engine::ops::EngineOps>>;

/// A device loop over the generated model with `kv_blocks` blocks, driven by the test.
fn device(
    kv_blocks: usize,
    preemption: PreemptionMode,
    max_sequences: usize,
) -> (
    Loop,
    crossbeam_channel::Sender<Submission>,
    Arc<Usage>,
    usize,
) {
    let model = crate::model::generated::tiny_random().unwrap();
    let spec = ModelSpec {
        kv_blocks,
        max_sequences,
        max_batch_tokens: 64,
        swap_blocks: 64,
        preemption,
        ..ModelSpec::default_model()
    };
    let p = prepare(
        "tiny",
        model,
        &spec,
        CpuBackend::default(),
        "cpu".into(),
        None,
    )
    .unwrap();
    let block_bytes = p.slot.engine.kv_block_bytes();
    let usage = Arc::clone(&p.slot.usage);
    let mut sched = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    sched.add_model(p.slot.params.clone());
    let (jobs, inbox) = crossbeam_channel::unbounded();
    let arbiter = Arbiter::new(
        "cpu".into(),
        sched,
        vec![p.slot],
        inbox,
        Arc::new(Gate::default()),
        None,
    );
    (arbiter, jobs, usage, block_bytes)
}

fn request(
    tenant: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplingParams,
) -> GenerateRequest {
    GenerateRequest {
        tenant: tenant.into(),
        prompt,
        params,
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        limits: TenantParams::default(),
    }
}

fn submit(
    jobs: &crossbeam_channel::Sender<Submission>,
    request: GenerateRequest,
) -> mpsc::UnboundedReceiver<Event> {
    let (events, receiver) = mpsc::unbounded_channel();
    jobs.send(Submission {
        model: 0,
        request,
        events,
        submitted: Instant::now(),
    })
    .unwrap();
    receiver
}

/// Runs the loop until every receiver has its `Done`; returns each request's tokens.
fn drain(arbiter: &mut Loop, receivers: &mut [mpsc::UnboundedReceiver<Event>]) -> Vec<Vec<u32>> {
    let mut tokens = vec![Vec::new(); receivers.len()];
    let mut done = vec![false; receivers.len()];
    for _ in 0..10_000 {
        arbiter.turn();
        for (i, r) in receivers.iter_mut().enumerate() {
            while let Ok(event) = r.try_recv() {
                match event {
                    Event::Token { token, .. } => tokens[i].push(token),
                    Event::Done { .. } => done[i] = true,
                    Event::Error { message } => panic!("request {i} failed: {message}"),
                }
            }
        }
        if done.iter().all(|&d| d) {
            return tokens;
        }
    }
    panic!("requests did not finish: {done:?}");
}

#[test]
fn kv_cache_bytes_are_accounted_to_each_tenant_and_released() {
    let (mut arbiter, jobs, usage, block_bytes) = device(64, PreemptionMode::Recompute, 8);
    let block_bytes = block_bytes as u64;
    let greedy = SamplingParams::greedy();
    let _ra = submit(&jobs, request("alpha", vec![5; 20], 8, greedy.clone()));
    let _rb = submit(&jobs, request("beta", vec![6; 3], 8, greedy.clone()));
    let rc = submit(&jobs, request("alpha", vec![7; 40], 8, greedy));
    arbiter.turn();
    let held = usage.kv_by_tenant();
    // alpha: 20 and 40 prompt tokens (2 + 3 blocks); beta: 3 tokens (1 block).
    assert_eq!(held["alpha"], 5 * block_bytes, "{held:?}");
    assert_eq!(held["beta"], block_bytes, "{held:?}");

    // A request that goes away releases its blocks; the tenant's entry stays, lower.
    drop(rc);
    arbiter.turn();
    assert_eq!(usage.kv_by_tenant()["alpha"], 2 * block_bytes);
    while !arbiter.sched.is_empty() {
        arbiter.turn();
    }
    let held = usage.kv_by_tenant();
    assert_eq!((held["alpha"], held["beta"]), (0, 0), "{held:?}");
}

/// Four requests whose prompts fit a tiny cache but whose outputs do not: sequences are
/// preempted (swapped or recomputed) and resumed; every output equals the same request
/// served alone with room to spare, greedy and seeded.
#[test]
fn preempted_sequences_resume_exactly() {
    let sampled = SamplingParams {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: Some(11),
        ..SamplingParams::default()
    };
    let requests: Vec<GenerateRequest> = (0..4u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..18 + i).map(|t| (t * 7 + i * 13) % 200 + 1).collect();
            let params = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    seed: Some(11 + u64::from(i)),
                    ..sampled.clone()
                }
            };
            request(&format!("t{}", i % 2), prompt, 40, params)
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
            let mut rx = [submit(&jobs, r.clone())];
            drain(&mut arbiter, &mut rx).remove(0)
        })
        .collect();
    for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        // 4 x (18..21 + 40) tokens need 16 blocks; 10 hold the prompts and some output.
        let (mut arbiter, jobs, _, _) = device(10, mode, 8);
        let mut rx: Vec<_> = requests.iter().map(|r| submit(&jobs, r.clone())).collect();
        let together = drain(&mut arbiter, &mut rx);
        let report = arbiter.sched.report(0.0);
        let (swaps, recomputes) = report.iter().fold((0, 0), |(s, r), t| {
            (s + t.stats.preempted_swap, r + t.stats.preempted_recompute)
        });
        match mode {
            PreemptionMode::Swap => assert!(swaps > 0, "{report:?}"),
            _ => assert!(recomputes > 0 && swaps == 0, "{report:?}"),
        }
        assert_eq!(together, alone, "{mode:?}");
    }
}

#[test]
fn a_tenants_quota_and_queue_bound_are_enforced_at_submit() {
    let model = crate::model::generated::tiny_random().unwrap();
    let spec = ModelSpec {
        kv_blocks: 64,
        ..ModelSpec::default_model()
    };
    let config = DaemonConfig {
        models: vec![spec],
        scheduler: crate::config::SchedulerConfig {
            max_queued_per_tenant: 2,
            ..Default::default()
        },
        ..DaemonConfig::default()
    };
    let mut placed = Devices::default();
    place(
        &mut placed,
        0,
        "tiny",
        model,
        None,
        &config.models[0],
        &Placement::Cpu,
        None,
        None,
    )
    .unwrap();
    // No thread: submissions stay queued, so the bound is reached.
    let (jobs, _inbox) = crossbeam_channel::unbounded();
    let (_, p) = placed.cpu.remove(0);
    let handle = ModelHandle {
        info: p.info,
        tokenizer: p.tokenizer,
        template: p.template.map(Arc::new),
        jobs,
        index: 0,
        params: p.slot.params.clone(),
        gate: Arc::new(Gate::default()),
        max_queued: config.scheduler.max_queued_per_tenant,
        rejections: None,
        usage: p.slot.usage,
        schedule: Arc::default(),
        up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        dedicated: HashMap::new(),
        workers: Vec::new(),
    };
    let mut limited = request("a", vec![1; 20], 30, SamplingParams::greedy());
    limited.limits.kv_blocks = Some(3);
    let err = handle.submit(limited).unwrap_err();
    assert_eq!(err.reason(), "kv_blocks_quota");
    assert!(err.to_string().contains("may hold 3"), "{err}");
    let _a = handle
        .submit(request("a", vec![1; 4], 4, SamplingParams::greedy()))
        .unwrap();
    let _b = handle
        .submit(request("a", vec![1; 4], 4, SamplingParams::greedy()))
        .unwrap();
    let err = handle
        .submit(request("a", vec![1; 4], 4, SamplingParams::greedy()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SubmitError::QueueFull {
                queued: 2,
                retry_after_secs: 1,
                ..
            }
        ),
        "{err:?}"
    );
    // Another tenant has its own bound.
    let _c = handle
        .submit(request("b", vec![1; 4], 4, SamplingParams::greedy()))
        .unwrap();
}

#[test]
fn after_a_panic_every_request_on_the_device_fails_and_the_device_serves_on() {
    let (mut arbiter, jobs, usage, _) = device(64, PreemptionMode::Recompute, 8);
    let mut a = submit(
        &jobs,
        request("alpha", vec![5; 20], 8, SamplingParams::greedy()),
    );
    let mut b = submit(
        &jobs,
        request("beta", vec![6; 3], 8, SamplingParams::greedy()),
    );
    arbiter.turn();
    arbiter.recover();
    for r in [&mut a, &mut b] {
        let mut failed = false;
        while let Ok(event) = r.try_recv() {
            failed |= matches!(event, Event::Error { ref message } if message.contains("retry"));
        }
        assert!(failed);
    }
    assert!(arbiter.sched.is_empty());
    arbiter.turn();
    assert!(usage.kv_by_tenant().values().all(|&b| b == 0));
    // And it serves the next request.
    let mut c = [submit(
        &jobs,
        request("alpha", vec![7; 5], 4, SamplingParams::greedy()),
    )];
    assert_eq!(drain(&mut arbiter, &mut c)[0].len(), 4);
}

#[test]
fn a_panic_taking_a_request_in_fails_it_alone_and_leaves_nothing_behind() {
    let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let gate = Arc::clone(&arbiter.gate);
    gate.enter(PANIC_IN_ACCEPT, 4).unwrap();
    let mut doomed = submit(
        &jobs,
        request(PANIC_IN_ACCEPT, vec![5; 4], 4, SamplingParams::greedy()),
    );
    gate.enter("beta", 4).unwrap();
    let mut fine = [submit(
        &jobs,
        request("beta", vec![6; 3], 4, SamplingParams::greedy()),
    )];
    arbiter.turn();
    let mut failed = false;
    while let Ok(event) = doomed.try_recv() {
        failed |= matches!(event, Event::Error { ref message } if message.contains("could not be started"));
    }
    assert!(failed, "the request that panicked gets an error");
    // Its queue place is given back, and the other request is served.
    assert_eq!(gate.enter(PANIC_IN_ACCEPT, 1), Ok(()));
    assert_eq!(drain(&mut arbiter, &mut fine)[0].len(), 4);
    assert!(arbiter.sched.is_empty());
}

#[test]
fn recovering_forgets_sequences_no_request_owns() {
    let (mut arbiter, _jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let params = TenantParams::default();
    arbiter
        .sched
        .submit(
            NewSeq {
                key: 999,
                tenant: "ghost".into(),
                params,
                model: 0,
                prompt_len: 4,
                max_tokens: 4,
            },
            0.0,
        )
        .unwrap();
    arbiter.recover();
    assert!(arbiter.sched.is_empty());
}
