//! A fixed-bucket latency histogram on atomics. It lives with the hub's
//! stats; the hub writes the delivery latency, the change stage the
//! walsender and intake latencies (each histogram has one writer);
//! [`crate::monitor`] renders them (and re-exports the type as
//! `monitor::histogram`).
//!
//! Invariants:
//! - [`LatencyHistogram::observe_micros`] never allocates and never locks: a short
//!   scan of the bucket bounds, then two relaxed `fetch_add`s. It is called
//!   once per transaction (the hub's path, or the change stage's at a Begin).
//! - Buckets are stored non-cumulatively (one counter per bucket plus one for
//!   values above the last bound); [`LatencyHistogram::snapshot`] turns them
//!   into Prometheus' cumulative `le` form, and the snapshot's count is the
//!   sum of its buckets, so `+Inf` always equals `_count` even while other
//!   threads observe.
//! - A negative latency (the database's clock ahead of ours) counts as 0.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the delivery-latency buckets, in microseconds: 0.5, 1, 2,
/// 5, 10, 25, 50, 100, 250, 500, 1000 and 2500 ms.
pub const DELIVERY_BUCKETS_MICROS: [u64; 12] =
    [500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];

/// Number of bounded buckets.
const BUCKETS: usize = DELIVERY_BUCKETS_MICROS.len();

/// A histogram of durations with the bounds of [`DELIVERY_BUCKETS_MICROS`].
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket; the last slot counts values above every bound.
    buckets: [AtomicU64; BUCKETS + 1],
    /// Sum of all observations, in microseconds.
    sum_micros: AtomicU64,
}

/// A point-in-time copy of a histogram, cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in µs, observations ≤ bound)`, in bound order.
    pub cumulative: [(u64, u64); BUCKETS],
    /// All observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of all observations, in microseconds.
    pub sum_micros: u64,
}

impl LatencyHistogram {
    /// Records one duration of `micros` microseconds (negative counts as 0).
    pub fn observe_micros(&self, micros: i64) {
        let micros = u64::try_from(micros).unwrap_or(0);
        let slot = DELIVERY_BUCKETS_MICROS.iter().position(|&bound| micros <= bound).unwrap_or(BUCKETS);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The histogram now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [(0u64, 0u64); BUCKETS];
        let mut running = 0u64;
        for (i, bound) in DELIVERY_BUCKETS_MICROS.iter().enumerate() {
            running += self.buckets[i].load(Ordering::Relaxed);
            cumulative[i] = (*bound, running);
        }
        let count = running + self.buckets[BUCKETS].load(Ordering::Relaxed);
        HistogramSnapshot { cumulative, count, sum_micros: self.sum_micros.load(Ordering::Relaxed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_cumulative() {
        let h = LatencyHistogram::default();
        h.observe_micros(0);
        h.observe_micros(500); // exactly on the first bound: le="0.0005"
        h.observe_micros(501);
        h.observe_micros(2_500_000);
        h.observe_micros(2_500_001); // only +Inf
        h.observe_micros(-7); // clock skew: counts as 0
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.cumulative[0], (500, 3));
        assert_eq!(s.cumulative[1], (1_000, 4));
        assert_eq!(s.cumulative[BUCKETS - 2], (1_000_000, 4));
        assert_eq!(s.cumulative[BUCKETS - 1], (2_500_000, 5));
        assert_eq!(s.sum_micros, 500 + 501 + 2_500_000 + 2_500_001);
        for pair in s.cumulative.windows(2) {
            assert!(pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1);
        }
    }

    #[test]
    fn empty_histogram() {
        let s = LatencyHistogram::default().snapshot();
        assert_eq!(s.count, 0);
        assert_eq!(s.sum_micros, 0);
        assert!(s.cumulative.iter().all(|&(_, n)| n == 0));
    }

    #[test]
    fn concurrent_observations_all_count() {
        let h = std::sync::Arc::new(LatencyHistogram::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        h.observe_micros(i64::from(i * (t + 1)));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(h.snapshot().count, 40_000);
    }
}
