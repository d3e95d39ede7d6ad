//! Counters the agent exports in status and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Primary-side counters of one resource.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub writes: Counter,
    pub write_bytes: Counter,
    pub flushes: Counter,
    pub discards: Counter,
    pub reads: Counter,
    pub read_bytes: Counter,
    pub local_io_errors: Counter,
    pub peer_disconnects: Counter,
}

/// Standby-side counters of one resource.
#[derive(Debug, Default)]
pub struct ApplierStats {
    pub writes: Counter,
    pub write_bytes: Counter,
    pub flushes: Counter,
    pub discards: Counter,
    pub resync_writes: Counter,
    pub resync_bytes: Counter,
    pub checksum_errors: Counter,
    pub protocol_errors: Counter,
    pub io_errors: Counter,
}

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 10 s, about three
/// per decade — from a local NVMe write to a WAN peer's ack. Beyond the last: `+Inf`.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// A latency histogram that costs the data path two relaxed atomic additions and a short
/// scan of [`LATENCY_BUCKETS`]: no lock, no allocation. Readers take a [`LatencySnapshot`];
/// the count is the sum of the buckets read, so a snapshot is always self-consistent in its
/// counts (its sum may include an observation or two its buckets do not yet show).
#[derive(Debug)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0) }
    }
}

impl LatencyHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        LatencySnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// What a [`LatencyHistogram`] held at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Observations per bucket of [`LATENCY_BUCKETS`] (not cumulative), then `+Inf`.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl LatencySnapshot {
    /// `(upper bound, observations in the bucket)`, the last bound `+Inf`.
    pub fn bounded(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(self.buckets.iter().copied())
    }

    pub fn mean_secs(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_secs / self.count as f64)
    }

    /// The `q` quantile (0..=1) estimated as Prometheus' `histogram_quantile` does: linear
    /// interpolation inside the bucket that holds it. `None` without observations; the
    /// last finite bound when it falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (le, n) in self.bounded() {
            if n > 0 && (below + n) as f64 >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let within = (rank - below as f64) / n as f64;
                return Some(lower + (le - lower) * within);
            }
            below += n;
            if le.is_finite() {
                lower = le;
            }
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50)); // exactly on a bound: that bucket
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(60)); // beyond the last bound
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(*s.buckets.last().unwrap(), 1);
        assert!((s.sum_secs - 60.000101).abs() < 1e-9, "{}", s.sum_secs);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = LatencyHistogram::default();
        for _ in 0..100 {
            h.observe(Duration::from_micros(300)); // (250 µs, 500 µs]
        }
        let s = h.snapshot();
        let p50 = s.quantile(0.5).unwrap();
        assert!((p50 - 0.000375).abs() < 1e-9, "{p50}");
        assert_eq!(s.quantile(1.0), Some(0.0005));
        assert_eq!(LatencyHistogram::default().snapshot().quantile(0.5), None);
    }

    #[test]
    fn concurrent_observers_lose_nothing() {
        let h = std::sync::Arc::new(LatencyHistogram::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros(t * 1000 + i % 7));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.snapshot().count, 40_000);
    }
}
