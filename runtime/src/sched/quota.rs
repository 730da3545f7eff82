//! Per-tenant rate quota: a token bucket over prompt and generated tokens.
//!
//! Pure arithmetic over a caller-supplied clock (seconds since any fixed start), so the
//! simulator and tests drive it with virtual time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Token buckets by tenant name, shared by every device's scheduler.
pub type Buckets = Arc<Mutex<HashMap<String, TokenBucket>>>;

/// Locks `buckets` (a panic elsewhere cannot leave a bucket half-updated: every update is one
/// assignment).
pub(crate) fn lock(buckets: &Buckets) -> MutexGuard<'_, HashMap<String, TokenBucket>> {
    buckets
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A bucket of `capacity` tokens refilled at `capacity / 60` per second
/// (`limits.tokens_per_minute`). Admission needs the prompt to fit in the level; generated
/// tokens are charged as they are produced and may take the level below zero, which delays
/// the tenant's next admission rather than stalling a stream mid-answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    level: f64,
    updated: f64,
}

impl TokenBucket {
    /// A full bucket for `per_minute` tokens, as of `now`.
    pub fn new(per_minute: u64, now: f64) -> Self {
        let capacity = per_minute as f64;
        Self {
            capacity,
            level: capacity,
            updated: now,
        }
    }

    /// Changes the rate (a policy reload), keeping the level within the new capacity.
    pub fn set_capacity(&mut self, per_minute: u64) {
        self.capacity = per_minute as f64;
        self.level = self.level.min(self.capacity);
    }

    fn refill(&mut self, now: f64) {
        if now > self.updated {
            let rate = self.capacity / 60.0;
            self.level = (self.level + (now - self.updated) * rate).min(self.capacity);
            self.updated = now;
        }
    }

    /// Tokens available now (negative after an overdraft).
    pub fn level(&mut self, now: f64) -> f64 {
        self.refill(now);
        self.level
    }

    /// Whether `tokens` fit now.
    pub fn fits(&mut self, tokens: usize, now: f64) -> bool {
        self.level(now) >= tokens as f64
    }

    /// Takes `tokens`, overdrawing if need be.
    pub fn charge(&mut self, tokens: usize, now: f64) {
        self.refill(now);
        self.level -= tokens as f64;
    }

    /// Seconds until `tokens` fit (0 when they fit now; infinite if they never can).
    pub fn wait_for(&mut self, tokens: usize, now: f64) -> f64 {
        let missing = tokens as f64 - self.level(now);
        if missing <= 0.0 {
            0.0
        } else if tokens as f64 > self.capacity || self.capacity <= 0.0 {
            f64::INFINITY
        } else {
            missing / (self.capacity / 60.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_capacity() {
        let mut b = TokenBucket::new(600, 0.0); // 10 tokens per second
        assert!(b.fits(600, 0.0));
        assert!(!b.fits(601, 0.0));
        b.charge(600, 0.0);
        assert_eq!(b.level(0.0), 0.0);
        assert!((b.level(3.0) - 30.0).abs() < 1e-9);
        assert!((b.wait_for(50, 3.0) - 2.0).abs() < 1e-9);
        // Overdraft: generated tokens may take it below zero.
        b.charge(100, 3.0);
        assert!((b.level(3.0) + 70.0).abs() < 1e-9);
        assert!(!b.fits(1, 9.0));
        assert!(b.fits(1, 10.2));
        // Idle time refills to capacity, never above.
        assert_eq!(b.level(1000.0), 600.0);
        assert_eq!(b.wait_for(601, 1000.0), f64::INFINITY);
        b.set_capacity(60);
        assert_eq!(b.level(1000.0), 60.0);
    }
}
