use super::*;
use crate::config::PreemptionMode;
use crate::engine::ops::{EngineOps, Loss};
use crate::engine::{EngineError, SeqId, StepInput, StepOutput};
use crate::sched::{PolicyKind, Pricing, Scheduler};
use std::time::Duration;

use self::arbiter::Arbiter;

/// A tenant whose requests panic while the device loop takes them in.
pub(super) const PANIC_IN_ACCEPT: &str = "panics-in-accept";

/// A device loop as the daemon builds it: engines behind the ops trait.
type Loop = Arbiter<Box<dyn EngineOps>>;

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
    device_with(kv_blocks, preemption, max_sequences, |engine| engine)
}

/// [`device`], with the model's engine behind `wrap`.
fn device_with(
    kv_blocks: usize,
    preemption: PreemptionMode,
    max_sequences: usize,
    wrap: impl FnOnce(Box<dyn EngineOps>) -> Box<dyn EngineOps>,
) -> (
    Loop,
    crossbeam_channel::Sender<Submission>,
    Arc<Usage>,
    usize,
) {
    let spec = ModelSpec {
        kv_blocks,
        max_sequences,
        max_batch_tokens: 64,
        swap_blocks: 64,
        preemption,
        ..ModelSpec::default_model()
    };
    let mut slot = tiny_slot("tiny", &spec);
    slot.engine = wrap(slot.engine);
    let block_bytes = slot.engine.kv_block_bytes();
    let usage = Arc::clone(&slot.usage);
    let mut sched = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    sched.add_model(slot.params.clone());
    let (jobs, inbox) = crossbeam_channel::unbounded();
    let arbiter = Arbiter::new(
        "cpu".into(),
        sched,
        vec![slot],
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
        guide: None,
    }
}

fn submit(
    jobs: &crossbeam_channel::Sender<Submission>,
    request: GenerateRequest,
) -> mpsc::UnboundedReceiver<Event> {
    let (events, receiver) = mpsc::unbounded_channel();
    jobs.send(Submission {
        model: 0,
        generation: 0,
        request,
        events,
        submitted: Instant::now(),
    })
    .unwrap();
    receiver
}

/// The tokens `request` gets on a device of its own with room to spare.
fn served_alone(request: &GenerateRequest) -> Vec<u32> {
    let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let mut rx = [submit(&jobs, request.clone())];
    drain(&mut arbiter, &mut rx).remove(0)
}

/// Runs the loop until every receiver has its `Done`; returns each request's tokens.
fn drain(arbiter: &mut Loop, receivers: &mut [mpsc::UnboundedReceiver<Event>]) -> Vec<Vec<u32>> {
    outcomes(arbiter, receivers)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|message| panic!("request {i} failed: {message}")))
        .collect()
}

/// Runs the loop until every receiver has ended; returns each request's tokens or error.
fn outcomes(
    arbiter: &mut Loop,
    receivers: &mut [mpsc::UnboundedReceiver<Event>],
) -> Vec<Result<Vec<u32>, String>> {
    let mut results: Vec<Option<Result<Vec<u32>, String>>> = vec![None; receivers.len()];
    let mut tokens = vec![Vec::new(); receivers.len()];
    for _ in 0..10_000 {
        arbiter.turn();
        for (i, r) in receivers.iter_mut().enumerate() {
            while let Ok(event) = r.try_recv() {
                match event {
                    Event::Token { token, .. } => tokens[i].push(token),
                    Event::Done { .. } => results[i] = Some(Ok(std::mem::take(&mut tokens[i]))),
                    Event::Error { message, .. } => results[i] = Some(Err(message)),
                }
            }
        }
        if results.iter().all(Option::is_some) {
            return results.into_iter().flatten().collect();
        }
    }
    panic!("requests did not finish");
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
    let alone: Vec<Vec<u32>> = requests.iter().map(served_alone).collect();
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
    let (_, p) = place(
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
    let handle = ModelHandle {
        guides: Arc::new(crate::guide::Guides::new(
            Arc::clone(&p.tokenizer),
            p.info.vocab_size,
        )),
        info: p.info,
        tokenizer: p.tokenizer,
        template: p.template.map(Arc::new),
        jobs,
        control: crossbeam_channel::unbounded().0,
        index: 0,
        generation: 0,
        params: p.slot.params.clone(),
        gate: Arc::new(Gate::default()),
        max_queued: config.scheduler.max_queued_per_tenant,
        rejections: None,
        usage: p.slot.usage,
        dedicated_usage: Vec::new(),
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

    // The KV metrics add what a dedicated tenant's own engine holds to the shared engine's.
    let mut handle = handle;
    let own = Arc::new(Usage::default());
    *own.kv_by_tenant.lock().unwrap() =
        HashMap::from([("a".to_owned(), 8192), ("b".to_owned(), 0)]);
    *handle.usage.kv_by_tenant.lock().unwrap() =
        HashMap::from([("a".to_owned(), 0), ("b".to_owned(), 4096)]);
    handle.dedicated_usage.push(own);
    assert_eq!(
        handle.kv_by_tenant(),
        HashMap::from([("a".to_owned(), 8192), ("b".to_owned(), 4096)])
    );
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
            failed |=
                matches!(event, Event::Error { ref message, .. } if message.contains("retry"));
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
        failed |= matches!(event, Event::Error { ref message, .. } if message.contains("could not be started"));
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

/// The `EngineOps` methods a test engine leaves to its `inner` engine.
macro_rules! forward_to_inner {
    () => {
        fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
            self.inner.swap_out(id)
        }
        fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
            self.inner.swap_in(id)
        }
        forward_queries_to_inner!();
    };
}

/// The `EngineOps` queries a test engine that swaps its own way leaves to its `inner` engine.
macro_rules! forward_queries_to_inner {
    () => {
        fn is_swapped(&self, id: SeqId) -> bool {
            self.inner.is_swapped(id)
        }
        fn sequence_len(&self, id: SeqId) -> Option<usize> {
            self.inner.sequence_len(id)
        }
        fn kv_block_bytes(&self) -> usize {
            self.inner.kv_block_bytes()
        }
    };
}

/// What a test reads back of a [`MemoryLimited`] engine the loop owns: the largest batch
/// stepped before the first kill, then after each.
type Batches = Arc<Mutex<Vec<usize>>>;

/// An engine whose worker the kernel kills at a memory limit: a step whose batch holds more
/// than `limit_tokens` of KV loses every sequence, as a worker killed by its cgroup would.
struct MemoryLimited {
    inner: Box<dyn EngineOps>,
    limit_tokens: usize,
    live: std::collections::HashSet<SeqId>,
    lost: Option<Loss>,
    batches: Batches,
}

impl EngineOps for MemoryLimited {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        let id = self.inner.add_sequence()?;
        self.live.insert(id);
        Ok(id)
    }
    fn remove_sequence(&mut self, id: SeqId) {
        if self.live.remove(&id) {
            self.inner.remove_sequence(id);
        }
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        let held: usize = inputs
            .iter()
            .map(|i| self.inner.sequence_len(i.seq).unwrap_or(0) + i.tokens.len())
            .sum();
        let mut batches = self.batches.lock().unwrap();
        if held > self.limit_tokens {
            for id in self.live.drain() {
                self.inner.remove_sequence(id);
            }
            self.lost = Some(Loss::OutOfMemory {
                limit_bytes: Some(80 << 20),
            });
            batches.push(0);
            return Err(EngineError::WorkerLost("killed at its memory limit".into()));
        }
        if let Some(largest) = batches.last_mut() {
            *largest = (*largest).max(inputs.len());
        }
        self.inner.step(inputs)
    }
    forward_to_inner!();
    fn take_loss(&mut self) -> Option<Loss> {
        self.lost.take()
    }
}

/// A device loop whose model's worker is killed when a step holds more than `limit_tokens`.
fn memory_limited_device(
    limit_tokens: usize,
) -> (Loop, crossbeam_channel::Sender<Submission>, Batches) {
    let batches = Batches::new(Mutex::new(vec![0]));
    let watched = Arc::clone(&batches);
    let (arbiter, jobs, _, _) = device_with(64, PreemptionMode::Recompute, 8, move |inner| {
        Box::new(MemoryLimited {
            inner,
            limit_tokens,
            live: Default::default(),
            lost: None,
            batches: watched,
        })
    });
    (arbiter, jobs, batches)
}

/// Sequences that outgrow the worker's memory together run again one at a time after the
/// kernel kills it, and each finishes with the output it would have had; afterwards the model
/// batches again.
#[test]
fn after_a_kill_at_the_memory_limit_sequences_run_again_alone_and_finish_exactly() {
    let requests: Vec<GenerateRequest> = (0..3u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..10 + i).map(|t| (t * 5 + i * 11) % 200 + 1).collect();
            request("alpha", prompt, 30, SamplingParams::greedy())
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests.iter().map(served_alone).collect();

    // Each needs at most 12 + 30 tokens; three together pass 60 partway.
    let (mut arbiter, jobs, batches) = memory_limited_device(60);
    let mut rx: Vec<_> = requests.iter().map(|r| submit(&jobs, r.clone())).collect();
    let together: Vec<Vec<u32>> = outcomes(&mut arbiter, &mut rx)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(together, alone);
    assert_eq!(
        *batches.lock().unwrap(),
        [3, 1],
        "one kill of three at once, then one at a time"
    );

    // The survivors are done: two short requests share steps again.
    let short = |p: u32| request("alpha", vec![p; 4], 4, SamplingParams::greedy());
    let mut rx = vec![submit(&jobs, short(3)), submit(&jobs, short(4))];
    drain(&mut arbiter, &mut rx);
    assert_eq!(batches.lock().unwrap().last(), Some(&2));
}

/// A sequence that was alone when its worker was killed at the memory limit cannot fit: it
/// fails with an error naming the limit, and the others finish.
#[test]
fn a_sequence_killed_alone_at_the_memory_limit_fails_naming_the_limit() {
    let long = request("alpha", vec![9; 10], 40, SamplingParams::greedy());
    let short = request("alpha", vec![8; 5], 12, SamplingParams::greedy());
    let want_short = served_alone(&short);
    // The long one alone needs 50 tokens of KV: more than 30.
    let (mut arbiter, jobs, batches) = memory_limited_device(30);
    let mut rx = vec![submit(&jobs, long), submit(&jobs, short)];
    let results = outcomes(&mut arbiter, &mut rx);
    let message = results[0].clone().unwrap_err();
    assert!(
        message.contains("limits.memory, 80 MiB") && message.contains("alone"),
        "{message}"
    );
    assert_eq!(results[1], Ok(want_short));
    assert!(arbiter.sched.is_empty());
    // Killed together (at 31 tokens), then once more with the long one alone.
    let batches = batches.lock().unwrap().clone();
    assert_eq!(
        (batches.len(), &batches[..2]),
        (3, &[2, 1][..]),
        "{batches:?}"
    );
}

/// Under a grammar the output is the grammar's, and `ignore_eos` still holds: with the
/// grammar able to end after any `a`, the output runs on to `max_tokens` of them.
#[test]
fn a_guided_request_follows_its_grammar_and_ignore_eos_still_holds() {
    let model = crate::model::generated::tiny_random().unwrap();
    let vocab = model.config.vocab_size;
    let guides = crate::guide::Guides::new(Arc::new(model.tokenizer), vocab);
    let guide = guides
        .compile(&crate::guide::Grammar::Regex("a+".into()))
        .unwrap();
    let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    // Hot enough that, between `a` and EOS (all the grammar allows once an `a` is out), EOS
    // would come up about every other token.
    let sampled = SamplingParams {
        temperature: 50.0,
        seed: Some(5),
        ..SamplingParams::default()
    };
    let mut held = request("alpha", vec![7; 5], 12, sampled);
    held.guide = Some(guide);
    let tokens = drain(&mut arbiter, &mut [submit(&jobs, held)]).remove(0);
    assert_eq!(tokens, vec![u32::from(b'a'); 12]);
}

#[test]
fn a_tenants_job_lines_queue_apart_from_its_interactive_requests() {
    let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let gate = Arc::clone(&arbiter.gate);
    let interactive = request("alpha", vec![5; 4], 4, SamplingParams::greedy());
    let mut batch = interactive.clone();
    batch.limits.class = crate::policy::PriorityClass::Batch;
    // A queue of one place each: the job's line fills its own, not the interactive one.
    gate.enter(&arbiter::queue_key(&batch), 1).unwrap();
    assert!(gate.enter(&arbiter::queue_key(&batch), 1).is_err());
    assert_eq!(gate.enter(&arbiter::queue_key(&interactive), 1), Ok(()));
    gate.leave(&arbiter::queue_key(&interactive));
    // The device loop gives the place back under the same key once the line is admitted.
    let mut line = [submit(&jobs, batch.clone())];
    assert_eq!(drain(&mut arbiter, &mut line)[0].len(), 4);
    assert_eq!(gate.enter(&arbiter::queue_key(&batch), 1), Ok(()));
}

/// The generated model's engine on the CPU, as `name` with `spec`'s limits.
fn tiny_slot(name: &str, spec: &ModelSpec) -> Slot<Box<dyn EngineOps>> {
    let model = crate::model::generated::tiny_random().unwrap();
    prepare(name, model, spec, CpuBackend::default(), "cpu".into(), None)
        .unwrap()
        .slot
}

/// A second model's limits: small, recomputing preempted sequences.
fn small_spec() -> ModelSpec {
    ModelSpec {
        kv_blocks: 32,
        max_sequences: 8,
        max_batch_tokens: 64,
        swap_blocks: 0,
        preemption: PreemptionMode::Recompute,
        ..ModelSpec::default_model()
    }
}

fn submit_to(
    jobs: &crossbeam_channel::Sender<Submission>,
    (model, generation): (usize, u64),
    request: GenerateRequest,
) -> mpsc::UnboundedReceiver<Event> {
    let (events, receiver) = mpsc::unbounded_channel();
    jobs.send(Submission {
        model,
        generation,
        request,
        events,
        submitted: Instant::now(),
    })
    .unwrap();
    receiver
}

/// Sends `message` to the loop and turns it until `reply` answers.
fn control<T>(
    arbiter: &mut Loop,
    orders: &crossbeam_channel::Sender<arbiter::Control<Box<dyn EngineOps>>>,
    message: arbiter::Control<Box<dyn EngineOps>>,
    reply: std::sync::mpsc::Receiver<T>,
) -> T {
    orders.send(message).unwrap();
    answer(arbiter, reply)
}

/// Turns the loop until `reply` answers.
fn answer<T>(arbiter: &mut Loop, reply: std::sync::mpsc::Receiver<T>) -> T {
    for _ in 0..1000 {
        arbiter.turn();
        if let Ok(answer) = reply.recv_timeout(Duration::from_millis(5)) {
            return answer;
        }
    }
    panic!("the loop did not answer");
}

#[test]
fn a_model_is_placed_and_taken_off_a_running_device_without_touching_the_other() {
    let greedy = SamplingParams::greedy();
    let long = request("alpha", (1..30).collect(), 60, greedy.clone());
    let alone = served_alone(&long);
    let (arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let (orders, inbox) = crossbeam_channel::unbounded();
    let schedule = Arc::new(Mutex::new(DeviceSchedule::default()));
    let mut arbiter = arbiter
        .with_control(inbox)
        .with_schedule(Arc::clone(&schedule));

    // Model 0 streams while a second model is placed beside it.
    let mut streaming = [submit_to(&jobs, (0, 0), long)];
    arbiter.turn();
    let (reply, placed) = std::sync::mpsc::sync_channel(1);
    let slots = vec![tiny_slot("second", &small_spec())];
    let placed = control(
        &mut arbiter,
        &orders,
        arbiter::Control::Place { slots, reply },
        placed,
    );
    assert_eq!(placed, [(1, 1)], "index 1, the device's second placement");
    assert_eq!(schedule.lock().unwrap().models, ["tiny", "second"]);

    // The second model serves, then goes with a request in flight and no grace: that request
    // fails saying why, and its model takes no more.
    let mut second = [submit_to(
        &jobs,
        (1, 1),
        request("beta", vec![3; 8], 200, greedy.clone()),
    )];
    for _ in 0..3 {
        arbiter.turn();
    }
    let (reply, retired) = std::sync::mpsc::sync_channel(1);
    let retire = arbiter::Control::Retire {
        models: vec![(1, 1)],
        grace: Duration::ZERO,
        reply,
    };
    let retired = control(&mut arbiter, &orders, retire, retired);
    assert_eq!(
        retired,
        arbiter::Retired {
            finished: 0,
            cancelled: 1
        }
    );
    let failed = outcomes(&mut arbiter, &mut second).remove(0).unwrap_err();
    assert!(failed.contains("unloaded model \"second\""), "{failed}");
    let mut late = [submit_to(
        &jobs,
        (1, 1),
        request("beta", vec![3; 8], 4, greedy.clone()),
    )];
    let refused = outcomes(&mut arbiter, &mut late).remove(0).unwrap_err();
    assert!(refused.contains("being unloaded"), "{refused}");
    assert_eq!(schedule.lock().unwrap().models, ["tiny"]);

    // The first model's stream went on as if nothing happened.
    assert_eq!(drain(&mut arbiter, &mut streaming).remove(0), alone);

    // The next model placed takes the free index; a model with grace finishes its requests.
    let (reply, placed) = std::sync::mpsc::sync_channel(1);
    let slots = vec![tiny_slot("third", &small_spec())];
    let placed = control(
        &mut arbiter,
        &orders,
        arbiter::Control::Place { slots, reply },
        placed,
    );
    assert_eq!(placed, [(1, 2)]);
    // A retire naming an earlier placement of an index (a stopped loop's model) takes off
    // nothing: the model there now serves on.
    let (reply, retired) = std::sync::mpsc::sync_channel(1);
    let stale = arbiter::Control::Retire {
        models: vec![(1, 1), (0, 99)],
        grace: Duration::ZERO,
        reply,
    };
    assert_eq!(
        control(&mut arbiter, &orders, stale, retired),
        arbiter::Retired::default()
    );
    assert_eq!(schedule.lock().unwrap().models, ["tiny", "third"]);
    // A request made for the unloaded model, arriving late, does not run on the model that
    // took its index.
    let mut stale = [submit_to(
        &jobs,
        (1, 1),
        request("beta", vec![3; 8], 4, greedy.clone()),
    )];
    let refused = outcomes(&mut arbiter, &mut stale).remove(0).unwrap_err();
    assert!(refused.contains("unloaded"), "{refused}");
    let third = request("gamma", vec![4; 8], 12, greedy);
    let mut on_third = [submit_to(&jobs, (1, 2), third.clone())];
    arbiter.turn();
    let (reply, retired) = std::sync::mpsc::sync_channel(1);
    let retire = arbiter::Control::Retire {
        models: vec![(1, 2)],
        grace: Duration::from_secs(60),
        reply,
    };
    orders.send(retire).unwrap();
    let finished = drain(&mut arbiter, &mut on_third).remove(0);
    assert_eq!(finished.len(), 12);
    let retired = answer(&mut arbiter, retired);
    assert_eq!(
        retired,
        arbiter::Retired {
            finished: 1,
            cancelled: 0
        }
    );
    assert!(arbiter.sched.is_empty());
}

/// An engine whose worker is being replaced until it has been asked `asks` times, and which
/// counts every call made of it meanwhile (none should be).
struct Replacing {
    inner: Box<dyn EngineOps>,
    asked: Arc<std::sync::atomic::AtomicUsize>,
    asks: usize,
    calls_while_starting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Replacing {
    fn up(&self) -> bool {
        let up = self.asked.load(std::sync::atomic::Ordering::SeqCst) > self.asks;
        if !up {
            self.calls_while_starting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        up
    }
}

impl EngineOps for Replacing {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        if !self.up() {
            return Err(EngineError::WorkerLost("being replaced".into()));
        }
        self.inner.add_sequence()
    }
    fn remove_sequence(&mut self, id: SeqId) {
        self.inner.remove_sequence(id);
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        if !self.up() {
            return Err(EngineError::WorkerLost("being replaced".into()));
        }
        self.inner.step(inputs)
    }
    forward_to_inner!();
    fn starting(&mut self) -> bool {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < self.asks
    }
}

#[test]
fn a_model_whose_worker_is_being_replaced_waits_while_the_other_model_steps() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let greedy = SamplingParams::greedy();
    let (arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 8);
    let (orders, inbox) = crossbeam_channel::unbounded();
    let mut arbiter = arbiter.with_control(inbox);
    let (asked, calls_while_starting) = (Arc::new(AtomicUsize::new(0)), Arc::default());
    let mut slot = tiny_slot("second", &small_spec());
    slot.engine = Box::new(Replacing {
        inner: slot.engine,
        asked: Arc::clone(&asked),
        asks: 200,
        calls_while_starting: Arc::clone(&calls_while_starting),
    });
    let (reply, placed) = std::sync::mpsc::sync_channel(1);
    let placed = control(
        &mut arbiter,
        &orders,
        arbiter::Control::Place {
            slots: vec![slot],
            reply,
        },
        placed,
    );
    assert_eq!(placed, [(1, 1)]);

    // The same tenant asks both models: the one being replaced holds nothing up.
    let first = request("alpha", (1..12).collect(), 20, greedy.clone());
    let alone = served_alone(&first);
    let mut waiting = [submit_to(
        &jobs,
        (1, 1),
        request("alpha", vec![3; 8], 10, greedy.clone()),
    )];
    let mut stepping = [submit_to(&jobs, (0, 0), first)];
    assert_eq!(drain(&mut arbiter, &mut stepping).remove(0), alone);
    assert!(
        asked.load(Ordering::SeqCst) < 200,
        "the other model finished only once the replacement was up"
    );
    assert!(
        waiting[0].try_recv().is_err(),
        "nothing ran on the model being replaced"
    );

    // Up again, it serves what waited.
    assert_eq!(drain(&mut arbiter, &mut waiting).remove(0).len(), 10);
    assert_eq!(calls_while_starting.load(Ordering::SeqCst), 0);
}

/// An engine whose "disk tier" is the host tier, and whose every swap-in from it fails as a
/// block failing authentication in a worker would.
struct DiskFails {
    inner: Box<dyn EngineOps>,
    on_disk: std::collections::HashSet<SeqId>,
    failures: Arc<std::sync::atomic::AtomicUsize>,
}

impl EngineOps for DiskFails {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.inner.add_sequence()
    }
    fn remove_sequence(&mut self, id: SeqId) {
        self.on_disk.remove(&id);
        self.inner.remove_sequence(id);
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        self.inner.step(inputs)
    }
    fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
        self.inner.swap_out(id)
    }
    fn swap_out_to_disk(&mut self, id: SeqId, _: &str, _: bool) -> Result<(), EngineError> {
        self.inner.swap_out(id)?;
        self.on_disk.insert(id);
        Ok(())
    }
    fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
        if self.on_disk.contains(&id) {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // As a worker process reports it: a message, not the disk tier's own error.
            return Err(EngineError::Worker(
                "a KV block read back from tenant.kv failed authentication".into(),
            ));
        }
        self.inner.swap_in(id)
    }
    forward_queries_to_inner!();
}

/// Every sequence preempted to disk fails to come back (as a tampered block would): each is
/// recomputed instead, and every request still gets what it gets alone.
#[test]
fn a_sequence_that_cannot_come_back_from_disk_is_recomputed() {
    let requests: Vec<GenerateRequest> = (0..4u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..18 + i).map(|t| (t * 7 + i * 13) % 200 + 1).collect();
            request(&format!("t{}", i % 2), prompt, 40, SamplingParams::greedy())
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests.iter().map(served_alone).collect();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&failures);
    let (mut arbiter, jobs, _, _) = device_with(10, PreemptionMode::Swap, 8, move |inner| {
        Box::new(DiskFails {
            inner,
            on_disk: Default::default(),
            failures: counted,
        })
    });
    // Only the disk tier: every preemption that swaps goes there.
    let params = arbiter.models[0].params.clone();
    arbiter.models[0].params = ModelParams {
        swap_blocks: 0,
        disk_blocks: 64,
        disk_swap_min_tokens: 0,
        ..params
    };
    arbiter.sched = Scheduler::new(PolicyKind::FairShare, Pricing::default());
    arbiter.sched.add_model(arbiter.models[0].params.clone());
    let mut rx: Vec<_> = requests.iter().map(|r| submit(&jobs, r.clone())).collect();
    let together = drain(&mut arbiter, &mut rx);
    assert!(
        failures.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "some sequence went to disk"
    );
    assert_eq!(together, alone);
}

/// Requests of one tenant that start with the same cached prompt hold its blocks together,
/// and the scheduler counts those blocks once: six such requests run at once on a pool that
/// holds three of them counted apart (as it does without the prefix cache), and each gets
/// what it gets alone.
#[test]
fn blocks_shared_through_the_prefix_cache_are_counted_once_so_more_sequences_run() {
    let prefix: Vec<u32> = (0..96u32).map(|t| (t * 11) % 200 + 1).collect();
    let with_tail = |i: u32| {
        let mut prompt = prefix.clone();
        prompt.extend([201 + i, 211 + i, 221 + i]);
        request("t", prompt, 8, SamplingParams::greedy())
    };
    let requests: Vec<GenerateRequest> = (0..6).map(with_tail).collect();
    let alone: Vec<Vec<u32>> = requests.iter().map(served_alone).collect();
    for prefix_cache in [false, true] {
        // 6 blocks of prefix and 1 of tail and output each: 7 per request, 24 in the pool.
        let (mut arbiter, jobs, _, _) = device_with(24, PreemptionMode::Recompute, 8, |e| e);
        arbiter
            .models
            .iter_mut()
            .for_each(|(_, s)| s.prefix_cache = prefix_cache);
        // The prefix, computed once and cached.
        let mut first = [submit(&jobs, with_tail(30))];
        drain(&mut arbiter, &mut first);
        let mut rx: Vec<_> = requests.iter().map(|r| submit(&jobs, r.clone())).collect();
        let mut most = 0;
        let mut results: Vec<Option<Vec<u32>>> = vec![None; rx.len()];
        let mut tokens = vec![Vec::new(); rx.len()];
        for _ in 0..10_000 {
            arbiter.turn();
            let running: usize = arbiter.sched.report(0.0).iter().map(|t| t.running).sum();
            most = most.max(running);
            arbiter.sched.check_invariants().unwrap();
            for (i, r) in rx.iter_mut().enumerate() {
                while let Ok(event) = r.try_recv() {
                    match event {
                        Event::Token { token, .. } => tokens[i].push(token),
                        Event::Done { .. } => results[i] = Some(std::mem::take(&mut tokens[i])),
                        Event::Error { message, .. } => panic!("request {i} failed: {message}"),
                    }
                }
            }
            if results.iter().all(Option::is_some) {
                break;
            }
        }
        let together: Vec<Vec<u32>> = results.into_iter().flatten().collect();
        assert_eq!(together, alone, "prefix cache {prefix_cache}");
        assert_eq!(
            most,
            if prefix_cache { 6 } else { 3 },
            "prefix cache {prefix_cache}"
        );
    }
}

/// A request whose prompt the prefix cache comes to hold while it waits goes before an
/// earlier one of its tenant with nothing cached: its hint is looked at again as the cache
/// changes, not only when it arrived.
#[test]
fn a_waiting_request_whose_prefix_became_resident_goes_first() {
    let first: Vec<u32> = (0..40u32).map(|t| (t * 13) % 250 + 1).collect();
    let mut same_start = first[..32].to_vec();
    same_start.extend([7, 8, 9]);
    let other: Vec<u32> = (0..35u32).map(|t| (t * 17) % 250 + 2).collect();
    // One sequence at a time: the order they are admitted in is the order they finish in.
    let (mut arbiter, jobs, _, _) = device(64, PreemptionMode::Recompute, 1);
    let mut rx = [
        submit(&jobs, request("t", first, 4, SamplingParams::greedy())),
        submit(&jobs, request("t", other, 4, SamplingParams::greedy())),
        submit(&jobs, request("t", same_start, 4, SamplingParams::greedy())),
    ];
    // All three arrive before anything is cached; the first's prompt is then computed.
    arbiter.turn();
    std::thread::sleep(std::time::Duration::from_millis(120));
    let mut finished = Vec::new();
    for _ in 0..1000 {
        arbiter.turn();
        for (i, r) in rx.iter_mut().enumerate() {
            while let Ok(event) = r.try_recv() {
                if let Event::Done { .. } = event {
                    finished.push(i);
                }
            }
        }
        if finished.len() == 3 {
            break;
        }
    }
    assert_eq!(finished, [0, 2, 1]);
}
