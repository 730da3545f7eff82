//! The KV memory tiers, each against a bound measured in the same run:
//! - the host tier (the CPU backend's `swap_out` / `swap_in` of a sequence's blocks) against a
//!   plain memcpy of the same bytes;
//! - the disk tier (`DiskTier` writes and reads: io_uring, `O_DIRECT` where the filesystem
//!   allows, sealing off) against a fio-style sequential `pwrite` / `pread` of the same bytes,
//!   in the same slot size, with the same flags, on the same filesystem;
//! - the crossovers: for which lengths a swap to host or disk and back costs less than
//!   prefilling the sequence again, on the default model;
//! - capacity: sequences whose KV cache is kept at once (running or swapped out) with the
//!   tiers on, against the device tier alone, on the same device budget (the scheduler).
//!
//! `cargo bench -p accel-benches --bench tiers`; `ACCEL_BENCH_DIR` puts the disk tier's files
//! on another filesystem (default: the system's temporary directory).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::backend::{Backend, KvLayout};
use accel_runtime::engine::{Engine, LogitsWanted, StepInput};
use accel_runtime::kv::disk::{DiskTier, ALIGN, DEFAULT_BATCH};
use accel_runtime::sched::{ModelParams, NewSeq, PolicyKind, Pricing, Scheduler, TenantParams};
use criterion::Criterion;

/// Blocks moved per iteration: a 1,024-token sequence.
const BLOCKS: usize = 64;

/// Page-aligned bytes for the peer's `O_DIRECT` I/O.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(bytes: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(bytes, ALIGN).expect("layout");
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds layout.size() zeroed bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The peer: what fio's `rw=write` then `rw=read` do with `bs=slot`, `direct=` as the tier,
/// one file created per pass and removed after.
fn peer_pass(dir: &Path, slot: usize, direct: bool, buf: &mut Aligned) -> (Duration, Duration) {
    let path = dir.join("peer.bin");
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    if direct {
        options.custom_flags(accel_runtime::kv::disk::O_DIRECT);
    }
    let file = options.open(&path).expect("open the peer's file");
    // As fio does by default (fallocate=native), and as the tier grows its files.
    let _ = accel_runtime::kv::disk::preallocate(&file, (BLOCKS * slot) as u64);
    let chunk = &mut buf.slice()[..slot];
    let started = Instant::now();
    for i in 0..BLOCKS {
        file.write_all_at(chunk, (i * slot) as u64).expect("pwrite");
    }
    let write = started.elapsed();
    let started = Instant::now();
    for i in 0..BLOCKS {
        file.read_exact_at(chunk, (i * slot) as u64).expect("pread");
    }
    let read = started.elapsed();
    drop(file);
    std::fs::remove_file(&path).expect("remove the peer's file");
    (write, read)
}

fn layout_of(config: &accel_runtime::model::ModelConfig, blocks: usize) -> KvLayout {
    KvLayout {
        num_layers: config.num_layers,
        num_blocks: blocks,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    }
}

fn median_of(mut samples: Vec<f64>) -> f64 {
    accel_benches::median(&mut samples).unwrap_or(f64::NAN)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (model, _, source) = accel_benches::default_model();
    println!(
        "model: {}",
        source
            .as_ref()
            .map_or("the generated model".to_owned(), |p| p
                .display()
                .to_string())
    );
    let backend = CpuBackend::default();
    let layout = layout_of(&model.config, BLOCKS);
    let kv = backend.alloc_kv(&layout).expect("KV cache");
    let mut host = backend.alloc_host_kv(&layout, BLOCKS).expect("host tier");
    let block_bytes = backend.host_block(&host, 0).expect("a host block").len();
    let bytes = block_bytes * BLOCKS;
    println!(
        "{BLOCKS} blocks of {block_bytes} bytes: {:.1} MiB",
        bytes as f64 / 1048576.0
    );
    let pairs: Vec<(u32, u32)> = (0..BLOCKS as u32).map(|b| (b, b)).collect();
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];

    let dir = std::env::var_os("ACCEL_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let scratch = tempfile::tempdir_in(&dir).expect("a directory for the disk tier");
    let mut tier = DiskTier::open(
        &scratch.path().join("tier"),
        block_bytes,
        BLOCKS,
        DEFAULT_BATCH,
    )
    .expect("disk tier");
    let slot = block_bytes.div_ceil(ALIGN) * ALIGN;
    println!(
        "disk tier in {}: O_DIRECT {}, io_uring {}",
        dir.display(),
        tier.is_direct(),
        tier.uses_io_uring()
    );
    let mut peer_buf = Aligned::new(slot);

    let ledger = accel_benches::Ledger::default();
    let mut group = c.benchmark_group("kv_tiers");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("host_memcpy_bound", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dst.copy_from_slice(std::hint::black_box(&src));
            }
            let elapsed = t.elapsed();
            ledger.record("host_memcpy_bound", elapsed, iters);
            elapsed
        })
    });
    group.bench_function("host_swap_out", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                backend.swap_out(&kv, &mut host, &pairs).expect("swap out");
            }
            let elapsed = t.elapsed();
            ledger.record("host_swap_out", elapsed, iters);
            elapsed
        })
    });
    let mut kv_in = backend.alloc_kv(&layout).expect("KV cache");
    group.bench_function("host_swap_in", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                backend.swap_in(&host, &mut kv_in, &pairs).expect("swap in");
            }
            let elapsed = t.elapsed();
            ledger.record("host_swap_in", elapsed, iters);
            elapsed
        })
    });
    let direct = tier.is_direct();
    group.bench_function("disk_peer_write_read_bound", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (w, r) = peer_pass(scratch.path(), slot, direct, &mut peer_buf);
                ledger.record("disk_peer_write_bound", w, 1);
                ledger.record("disk_peer_read_bound", r, 1);
                total += w + r;
            }
            total
        })
    });
    let block = backend.host_block(&host, 0).expect("a host block").to_vec();
    group.bench_function("disk_tier_write_read", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let blocks = tier
                    .write("bench", false, BLOCKS, |_, buf| {
                        buf.copy_from_slice(&block);
                        Ok::<_, ()>(())
                    })
                    .expect("disk tier write")
                    .expect("fill");
                let w = t.elapsed();
                let t = Instant::now();
                tier.read(&blocks, |_, bytes| {
                    std::hint::black_box(bytes);
                    Ok::<_, ()>(())
                })
                .expect("disk tier read")
                .expect("drain");
                let r = t.elapsed();
                tier.free(blocks);
                ledger.record("disk_tier_write", w, 1);
                ledger.record("disk_tier_read", r, 1);
                total += w + r;
            }
            total
        })
    });
    group.finish();

    let mean = |name: &str| ledger.mean(name).map_or(f64::NAN, |d| d.as_secs_f64());
    let gbps = |seconds: f64| bytes as f64 / seconds / 1e9;
    println!("\nhost tier ({} MiB per pass):", bytes >> 20);
    for op in ["host_swap_out", "host_swap_in"] {
        println!(
            "  {op}: {:.2} GB/s, {:.2} of a memcpy ({:.2} GB/s)",
            gbps(mean(op)),
            mean("host_memcpy_bound") / mean(op),
            gbps(mean("host_memcpy_bound"))
        );
    }
    println!("disk tier (sealing off):");
    for (op, peer) in [
        ("disk_tier_write", "disk_peer_write_bound"),
        ("disk_tier_read", "disk_peer_read_bound"),
    ] {
        println!(
            "  {op}: {:.2} GB/s, {:.2} of the sequential peer ({:.2} GB/s)",
            gbps(mean(op)),
            mean(peer) / mean(op),
            gbps(mean(peer))
        );
    }
    sealed_cost(&mut tier, &block);
    drop(tier);
    crossovers(&model, scratch.path());
    capacity();
}

/// Writing and reading the same blocks sealed (AES-256-GCM) against plain, a few passes.
fn sealed_cost(tier: &mut DiskTier, block: &[u8]) {
    let mut pass = |encrypt: bool| {
        let t = Instant::now();
        let blocks = tier
            .write("bench-sealed", encrypt, BLOCKS, |_, buf| {
                buf.copy_from_slice(block);
                Ok::<_, ()>(())
            })
            .expect("write")
            .expect("fill");
        tier.read(&blocks, |_, _| Ok::<_, ()>(()))
            .expect("read")
            .expect("drain");
        tier.free(blocks);
        t.elapsed().as_secs_f64()
    };
    let plain = median_of((0..5).map(|_| pass(false)).collect());
    let sealed = median_of((0..5).map(|_| pass(true)).collect());
    println!(
        "  sealed write+read: {:.1} ms against {:.1} ms plain ({:.2}x)",
        sealed * 1e3,
        plain * 1e3,
        sealed / plain
    );
}

/// Prefill against host and disk round trips at several lengths, each the median of 3.
fn crossovers(model: &accel_runtime::model::LoadedModel, dir: &Path) {
    let context = model.config.max_position_embeddings;
    let lengths: Vec<usize> = [16, 64, 256, 1024]
        .into_iter()
        .filter(|&n| n < context)
        .collect();
    let mut engine = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        BLOCKS + 8,
        16,
    )
    .expect("engine");
    engine.disable_prefix_cache();
    engine.enable_swap(BLOCKS).expect("host tier");
    let tier = DiskTier::open(
        &dir.join("crossover"),
        engine.kv_block_bytes(),
        BLOCKS,
        DEFAULT_BATCH,
    )
    .expect("disk tier");
    engine.enable_disk(tier).expect("disk tier");
    let vocab = model.config.vocab_size;
    println!("\ncrossovers (median of 3; a tier wins where its round trip is below the prefill):");
    println!(
        "  {:>6} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "tokens", "prefill", "host", "disk", "host/pre", "disk/pre"
    );
    let (mut host_from, mut disk_from) = (None, None);
    for &n in &lengths {
        let tokens: Vec<u32> = (0..n).map(|i| ((i * 17 + 3) % vocab) as u32).collect();
        let mut runs = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            let seq = engine.add_sequence();
            let t = Instant::now();
            engine
                .step(&[StepInput {
                    seq,
                    tokens: &tokens,
                    logits: LogitsWanted::Last,
                }])
                .expect("prefill");
            runs.0.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            engine.swap_out(seq).expect("swap out");
            engine.swap_in(seq).expect("swap in");
            runs.1.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            engine
                .swap_out_to_disk(seq, "bench", false)
                .expect("swap to disk");
            engine.swap_in(seq).expect("swap in from disk");
            runs.2.push(t.elapsed().as_secs_f64());
            engine.remove_sequence(seq);
        }
        let (prefill, host, disk) = (median_of(runs.0), median_of(runs.1), median_of(runs.2));
        if host < prefill && host_from.is_none() {
            host_from = Some(n);
        }
        if disk < prefill && disk_from.is_none() {
            disk_from = Some(n);
        }
        println!(
            "  {n:>6} {:>10.2}ms {:>10.2}ms {:>10.2}ms {:>10.4} {:>10.4}",
            prefill * 1e3,
            host * 1e3,
            disk * 1e3,
            host / prefill,
            disk / prefill
        );
    }
    let say = |from: Option<usize>| {
        from.map_or("never, at the lengths measured".to_owned(), |n| {
            format!("from {n} tokens (the shortest measured)")
        })
    };
    println!("  host tier beats recompute {}", say(host_from));
    println!("  disk tier beats recompute {}", say(disk_from));
}

/// Sequences whose KV cache is kept at once (running, or swapped out to a tier) while 64
/// requests of 64 + 192 tokens compete for 64 device blocks: device only (preemption
/// recomputes) against device + 128 host blocks + 1,024 disk blocks.
fn capacity() {
    let held = |swap_blocks: usize, disk_blocks: usize| {
        let mut s = Scheduler::new(PolicyKind::FairShare, Pricing::default());
        let model = s.add_model(ModelParams {
            block_size: 16,
            total_blocks: 64,
            swap_blocks,
            swap_min_tokens: 1,
            disk_blocks,
            disk_swap_min_tokens: 1,
            max_sequences: 64,
            max_batch_tokens: 512,
            price: 1.0,
            reserve_max_tokens: false,
        });
        for key in 0..64u64 {
            s.submit(
                NewSeq {
                    key,
                    tenant: format!("t{}", key % 4),
                    params: TenantParams::default(),
                    model,
                    prompt_len: 64,
                    max_tokens: 192,
                },
                0.0,
            )
            .expect("submit");
        }
        let (mut peak, mut generated) = (0, std::collections::HashMap::<u64, usize>::new());
        for _ in 0..100_000 {
            if s.is_empty() {
                break;
            }
            let plan = s.plan(0.0);
            for &(k, n) in &plan.run {
                let done = s.pending(k) == Some(n);
                s.advance(k, n, done, 0.0);
                if done {
                    let g = generated.entry(k).or_default();
                    *g += 1;
                    if *g == 192 {
                        s.remove(k);
                    }
                }
            }
            let kept: usize = s.report(0.0).iter().map(|t| t.running + t.swapped).sum();
            peak = peak.max(kept);
        }
        peak
    };
    let alone = held(0, 0);
    let tiered = held(128, 1024);
    println!(
        "\ncapacity: {tiered} sequences' KV kept at once with host and disk tiers, against {alone} on the device alone ({:.1}x)",
        tiered as f64 / alone.max(1) as f64
    );
}
