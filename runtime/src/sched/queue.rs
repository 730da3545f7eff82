//! A tenant's queues: per model on the device, its swapped-out sequences and its waiting
//! requests, each in arrival order, so a full model holds back only the requests for it.
//!
//! Entries are removed lazily: a sequence that finished or changed state stays until it
//! reaches a queue's front, where the caller's `live` check drops it. Costs: push O(1) (an
//! out-of-order preempted sequence O(n)), head O(models) amortised.

use std::collections::VecDeque;

use super::SeqKey;

#[derive(Debug, Default)]
struct ModelQueues {
    swapped: VecDeque<(u64, SeqKey)>,
    waiting: VecDeque<(u64, SeqKey)>,
}

/// Which queue a sequence is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queue {
    Swapped,
    Waiting,
}

#[derive(Debug, Default)]
pub(super) struct Queues {
    per_model: Vec<ModelQueues>,
}

fn insert_by_arrival(queue: &mut VecDeque<(u64, SeqKey)>, arrival: u64, key: SeqKey) {
    let at = queue
        .iter()
        .rposition(|&(a, _)| a <= arrival)
        .map_or(0, |i| i + 1);
    queue.insert(at, (arrival, key));
}

impl Queues {
    fn model(&mut self, model: usize) -> &mut ModelQueues {
        if self.per_model.len() <= model {
            self.per_model.resize_with(model + 1, ModelQueues::default);
        }
        &mut self.per_model[model]
    }

    /// Queues a sequence behind those that arrived before it.
    pub fn push(&mut self, queue: Queue, model: usize, arrival: u64, key: SeqKey) {
        let q = self.model(model);
        let q = match queue {
            Queue::Swapped => &mut q.swapped,
            Queue::Waiting => &mut q.waiting,
        };
        if q.back().is_none_or(|&(a, _)| a <= arrival) {
            q.push_back((arrival, key));
        } else {
            insert_by_arrival(q, arrival, key);
        }
    }

    /// Takes a sequence out of a queue now (it is starting).
    pub fn remove(&mut self, queue: Queue, model: usize, key: SeqKey) {
        let q = self.model(model);
        let q = match queue {
            Queue::Swapped => &mut q.swapped,
            Queue::Waiting => &mut q.waiting,
        };
        if q.front().is_some_and(|&(_, k)| k == key) {
            q.pop_front();
        } else {
            q.retain(|&(_, k)| k != key);
        }
    }

    /// The earliest live sequence at the front of any queue of a model `open` accepts (a
    /// swapped one before a waiting one of the same arrival), dropping dead entries it passes.
    pub fn head(
        &mut self,
        open: impl Fn(usize) -> bool,
        live: impl Fn(SeqKey, Queue) -> bool,
    ) -> Option<SeqKey> {
        let mut best: Option<(u64, SeqKey)> = None;
        for (m, q) in self.per_model.iter_mut().enumerate() {
            if !open(m) {
                continue;
            }
            for (queue, kind) in [
                (&mut q.swapped, Queue::Swapped),
                (&mut q.waiting, Queue::Waiting),
            ] {
                while let Some(&(arrival, key)) = queue.front() {
                    if live(key, kind) {
                        if best.is_none_or(|(a, _)| arrival < a) {
                            best = Some((arrival, key));
                        }
                        break;
                    }
                    queue.pop_front();
                }
            }
        }
        best.map(|(_, key)| key)
    }

    /// The key at the front of a model's waiting queue (perhaps a dead entry).
    pub fn waiting_front(&self, model: usize) -> Option<SeqKey> {
        self.per_model.get(model)?.waiting.front().map(|&(_, k)| k)
    }

    /// The first `n` entries of a model's waiting queue after its front (dead ones included).
    pub fn waiting_behind_front(
        &self,
        model: usize,
        n: usize,
    ) -> impl Iterator<Item = SeqKey> + '_ {
        self.per_model
            .get(model)
            .into_iter()
            .flat_map(move |q| q.waiting.iter().skip(1).take(n))
            .map(|&(_, k)| k)
    }

    /// The earliest arrival at any queue's front (dead entries included: an estimate for
    /// ranking), or `u64::MAX`.
    pub fn earliest(&self) -> u64 {
        self.per_model
            .iter()
            .flat_map(|q| [q.swapped.front(), q.waiting.front()])
            .flatten()
            .map(|&(a, _)| a)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Forgets every entry of a retired model (they are all dead by then).
    pub fn clear_model(&mut self, model: usize) {
        if let Some(q) = self.per_model.get_mut(model) {
            *q = ModelQueues::default();
        }
    }

    /// Every queued key, dead entries included.
    pub fn keys(&self) -> impl Iterator<Item = SeqKey> + '_ {
        self.per_model
            .iter()
            .flat_map(|q| q.swapped.iter().chain(&q.waiting))
            .map(|&(_, k)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_come_in_arrival_order_across_models_skipping_closed_ones_and_dead_entries() {
        let mut q = Queues::default();
        q.push(Queue::Waiting, 0, 5, 50);
        q.push(Queue::Waiting, 1, 3, 30);
        q.push(Queue::Waiting, 1, 7, 70);
        q.push(Queue::Swapped, 0, 4, 40);
        // A preempted sequence goes back ahead of later arrivals.
        q.push(Queue::Waiting, 1, 1, 10);
        let live = |k: SeqKey, _| k != 10;
        assert_eq!(q.head(|_| true, live), Some(30), "10 is dead and dropped");
        assert_eq!(
            q.head(|m| m == 0, live),
            Some(40),
            "swapped 4 before waiting 5"
        );
        q.remove(Queue::Swapped, 0, 40);
        assert_eq!(q.head(|m| m == 0, live), Some(50));
        q.remove(Queue::Waiting, 1, 30);
        assert_eq!(q.earliest(), 5);
        assert_eq!(q.head(|m| m == 1, live), Some(70));
        let mut keys: Vec<SeqKey> = q.keys().collect();
        keys.sort_unstable();
        assert_eq!(keys, [50, 70]);
        assert_eq!(q.head(|_| false, live), None);
    }
}
