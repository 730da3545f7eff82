//! Gives a model's engine its disk tier at load and measures where that tier pays: the
//! shortest sequence whose swap to disk and back costs less than prefilling it again, which
//! the scheduler uses as the model's `disk_swap_min_tokens`.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::config::{ModelSpec, PreemptionMode};
use crate::engine::{Engine, EngineError, LogitsWanted, SeqId, StepInput};
use crate::kv::disk::{DiskTier, DEFAULT_BATCH};

/// The scope the measurement's blocks are written under (its file is gone once it ends).
const MEASURE_SCOPE: &str = "\0crossover";

/// Opens the model's disk tier (in `spec.disk_dir`) and measures its crossover; returns the
/// scheduler's `disk_swap_min_tokens` (`usize::MAX`: no disk tier, or it never pays).
pub(crate) fn enable_disk_tier<B: Backend>(
    engine: &mut Engine<B>,
    spec: &ModelSpec,
    block_size: usize,
    vocab: usize,
    context: usize,
) -> usize {
    let Some(dir) = spec.disk_dir.as_deref() else {
        return usize::MAX;
    };
    if spec.disk_blocks == 0 || spec.preemption == PreemptionMode::Recompute {
        return usize::MAX;
    }
    let tier = DiskTier::open(
        dir,
        engine.kv_block_bytes(),
        spec.disk_blocks,
        DEFAULT_BATCH,
    )
    .map_err(EngineError::from)
    .and_then(|tier| {
        let (direct, uring) = (tier.is_direct(), tier.uses_io_uring());
        engine.enable_disk(tier).map(|()| (direct, uring))
    });
    match tier {
        Ok((direct, io_uring)) => {
            tracing::info!(model = %spec.name, dir = %dir.display(), blocks = spec.disk_blocks,
                direct, io_uring, "KV disk tier ready")
        }
        Err(e) => {
            tracing::warn!(model = %spec.name, dir = %dir.display(), error = %e,
                "no KV disk tier; preempted sequences the host tier cannot hold are recomputed");
            return usize::MAX;
        }
    }
    if spec.preemption == PreemptionMode::Swap {
        return 0;
    }
    let longest = (4 * block_size)
        .min(context.saturating_sub(1))
        .min(spec.disk_blocks * block_size);
    let points: Vec<usize> = [block_size.min(longest), longest]
        .into_iter()
        .filter(|&n| n > 0)
        .collect();
    let mut costs = Vec::new();
    for &n in &points {
        let tokens: Vec<u32> = (0..n).map(|i| (i % vocab.max(1)) as u32).collect();
        let to_disk = |e: &mut Engine<B>, seq| e.swap_out_to_disk(seq, MEASURE_SCOPE, false);
        match round_trip(engine, &tokens, to_disk) {
            Ok(cost) => costs.push((n, cost)),
            Err(e) => {
                tracing::warn!(model = %spec.name, error = %e,
                    "measuring the disk tier failed; preempted sequences the host tier cannot hold are recomputed");
                return usize::MAX;
            }
        }
    }
    let min_tokens = crossover(&costs);
    tracing::info!(model = %spec.name, measured = ?costs, disk_swap_min_tokens = min_tokens,
        "disk tier crossover measured");
    min_tokens
}

/// What a sequence costs to prefill, and to swap out to a tier and back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Costs {
    pub prefill: Duration,
    pub swap: Duration,
}

/// What a sequence of `tokens` costs to prefill (after an untimed warm-up step, which
/// allocates scratch buffers and loads kernels on a GPU), and to move out with `swap_out` and
/// back in; the host tier's crossover (`arbiter::preemption_crossover`) measures with it too.
pub(crate) fn round_trip<B: Backend>(
    engine: &mut Engine<B>,
    tokens: &[u32],
    swap_out: impl FnOnce(&mut Engine<B>, SeqId) -> Result<(), EngineError>,
) -> Result<Costs, EngineError> {
    let feed = |engine: &mut Engine<B>, seq| {
        engine.step(&[StepInput {
            seq,
            tokens,
            logits: LogitsWanted::Last,
        }])
    };
    let warm = engine.add_sequence();
    let warmed = feed(engine, warm);
    engine.remove_sequence(warm);
    warmed?;
    let seq = engine.add_sequence();
    let started = Instant::now();
    let fed = feed(engine, seq);
    let prefill = started.elapsed();
    let started = Instant::now();
    let moved = fed
        .and_then(|_| swap_out(engine, seq))
        .and_then(|()| engine.swap_in(seq))
        .and_then(|()| Ok(engine.backend().wait_copies()?));
    let swap = started.elapsed();
    engine.remove_sequence(seq);
    moved.map(|()| Costs { prefill, swap })
}

/// The fewest tokens at which the disk round trip beats the prefill, from measurements at
/// increasing lengths, each cost taken as linear in the tokens: 0 when it wins at the
/// shortest; past the longest, where the trend of the last two says they cross (prefill
/// grows faster than I/O); `usize::MAX` when they never do.
pub(crate) fn crossover(costs: &[(usize, Costs)]) -> usize {
    let wins = |c: &Costs| c.swap < c.prefill;
    let margin = |c: &Costs| c.prefill.as_secs_f64() - c.swap.as_secs_f64();
    // Where the line through two (tokens, margin) points reaches zero.
    let zero = |(n0, c0): &(usize, Costs), (n1, c1): &(usize, Costs)| {
        let (m0, m1) = (margin(c0), margin(c1));
        *n0 as f64 + (*n1 as f64 - *n0 as f64) * (-m0) / (m1 - m0)
    };
    match costs {
        [] => usize::MAX,
        [(_, first), ..] if wins(first) => 0,
        _ => {
            for pair in costs.windows(2) {
                if wins(&pair[1].1) {
                    // The margin goes from ≤ 0 at the first to > 0 at the second.
                    let at = zero(&pair[0], &pair[1]);
                    return (at.ceil() as usize).clamp(pair[0].0, pair[1].0);
                }
            }
            match costs {
                [.., a, b] if margin(&b.1) > margin(&a.1) && b.0 > a.0 => {
                    let at = zero(a, b).ceil();
                    if at.is_finite() && at < usize::MAX as f64 {
                        (at as usize).max(b.0)
                    } else {
                        usize::MAX
                    }
                }
                _ => usize::MAX,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(prefill_ms: u64, disk_ms: u64) -> Costs {
        Costs {
            prefill: Duration::from_millis(prefill_ms),
            swap: Duration::from_millis(disk_ms),
        }
    }

    #[test]
    fn the_crossover_is_where_the_disk_starts_to_win() {
        assert_eq!(crossover(&[]), usize::MAX);
        assert_eq!(crossover(&[(16, costs(10, 5)), (64, costs(40, 8))]), 0);
        // Margins −10 ms at 16 tokens and +10 ms at 64: they cross half way, at 40.
        assert_eq!(crossover(&[(16, costs(10, 20)), (64, costs(40, 30))]), 40);
        // Margins −10 ms at 16 and −5 ms at 64: the trend crosses at 112.
        assert_eq!(crossover(&[(16, costs(10, 20)), (64, costs(40, 45))]), 112);
        // The disk falls further behind as sequences grow: never.
        assert_eq!(
            crossover(&[(16, costs(10, 20)), (64, costs(40, 60))]),
            usize::MAX
        );
    }
}
