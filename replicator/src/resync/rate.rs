//! How fast a resync may go: an optional hard cap, an in-flight window sized from the
//! measured bandwidth-delay product, and a back-off to a minimum rate while the
//! application is writing (like DRBD's c-max-rate, c-fill-target and c-min-rate, without
//! the tuning: the window follows the link).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSettings {
    /// Never exceed this many bytes per second (None: no cap).
    pub max_rate: Option<u64>,
    /// While the application writes, resync at most this fast (bytes per second).
    pub min_rate: u64,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self { max_rate: None, min_rate: 16 << 20 }
    }
}

const MIN_WINDOW: u64 = 2 << 20;
const MAX_WINDOW: u64 = 64 << 20;
const INTERVAL: Duration = Duration::from_millis(100);
/// The application counts as busy for this long after it last wrote.
const BUSY_HOLD: Duration = Duration::from_millis(300);

#[derive(Debug)]
pub struct RateController {
    settings: RateSettings,
    window: u64,
    tokens: f64,
    last_refill: Instant,
    interval_start: Instant,
    acked_in_interval: u64,
    rate: f64,
    min_rtt: Option<Duration>,
    rtt_sum: Duration,
    rtt_n: u32,
    /// The window refused a send during this interval.
    window_limited: bool,
    app_bytes: u64,
    busy_until: Option<Instant>,
}

impl RateController {
    pub fn new(settings: RateSettings) -> Self {
        let now = Instant::now();
        Self {
            settings,
            window: 4 << 20,
            tokens: 0.0,
            last_refill: now,
            interval_start: now,
            acked_in_interval: 0,
            rate: 0.0,
            min_rtt: None,
            rtt_sum: Duration::ZERO,
            rtt_n: 0,
            window_limited: false,
            app_bytes: 0,
            busy_until: None,
        }
    }

    fn busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }

    /// The rate cap now in force, if any.
    pub fn cap(&self, now: Instant) -> Option<u64> {
        let busy = self.busy(now).then_some(self.settings.min_rate);
        match (self.settings.max_rate, busy) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn window(&self, now: Instant) -> u64 {
        if self.busy(now) {
            self.window.min(MIN_WINDOW)
        } else {
            self.window
        }
    }

    /// Whether `len` more bytes may be sent with `inflight` bytes unacknowledged; consumes
    /// rate tokens if so.
    pub fn try_send(&mut self, len: u64, inflight: u64, now: Instant) -> bool {
        if inflight > 0 && inflight + len > self.window(now) {
            self.window_limited = true;
            return false;
        }
        match self.cap(now) {
            None => true,
            Some(cap) => {
                let dt = now.duration_since(self.last_refill).as_secs_f64();
                self.last_refill = now;
                // Allow a burst of one chunk or 100 ms worth, whichever is larger.
                let burst = (cap as f64 * 0.1).max(len as f64);
                self.tokens = (self.tokens + dt * cap as f64).min(burst);
                if self.tokens >= len as f64 {
                    self.tokens -= len as f64;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// How long until `len` bytes' worth of tokens accumulate (for sleeping).
    pub fn wait_hint(&self, len: u64, now: Instant) -> Duration {
        match self.cap(now) {
            Some(cap) if cap > 0 => {
                let missing = (len as f64 - self.tokens).max(0.0);
                Duration::from_secs_f64((missing / cap as f64).min(0.1)).max(Duration::from_millis(1))
            }
            _ => Duration::from_millis(5),
        }
    }

    pub fn on_ack(&mut self, bytes: u64, rtt: Duration) {
        self.acked_in_interval += bytes;
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.rtt_sum += rtt;
        self.rtt_n += 1;
    }

    /// Called often; every interval re-estimates the rate and resizes the window, and notes
    /// whether the application wrote (`app_bytes` is its cumulative write counter).
    pub fn tick(&mut self, app_bytes: u64, now: Instant) -> Option<u64> {
        if app_bytes != self.app_bytes {
            self.app_bytes = app_bytes;
            self.busy_until = Some(now + BUSY_HOLD);
        }
        let dt = now.duration_since(self.interval_start);
        if dt < INTERVAL {
            return None;
        }
        let measured = self.acked_in_interval as f64 / dt.as_secs_f64();
        self.rate = if self.rate == 0.0 { measured } else { 0.7 * self.rate + 0.3 * measured };
        self.acked_in_interval = 0;
        self.interval_start = now;
        let avg_rtt = (self.rtt_n > 0).then(|| self.rtt_sum / self.rtt_n);
        if let (Some(min), Some(avg)) = (self.min_rtt, avg_rtt) {
            // Twice the bandwidth-delay product keeps the pipe full; measured with the
            // minimum RTT so queueing does not inflate it.
            let target =
                ((2.0 * self.rate * min.as_secs_f64()) as u64 + MIN_WINDOW).clamp(MIN_WINDOW, MAX_WINDOW);
            if avg > min * 3 {
                // Queueing somewhere (link, peer's disk): give back some of the window.
                self.window = target.max(self.window * 3 / 4);
            } else if self.window_limited {
                // The window, not the link, limits us: open it.
                self.window = (self.window * 3 / 2).clamp(target, MAX_WINDOW);
            } else {
                self.window = self.window.max(target);
            }
        }
        self.rtt_sum = Duration::ZERO;
        self.rtt_n = 0;
        self.window_limited = false;
        Some(self.rate as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_limits_bytes_per_second() {
        let mut c = RateController::new(RateSettings { max_rate: Some(1 << 20), min_rate: 1 << 20 });
        let start = Instant::now();
        let mut sent = 0u64;
        let mut t = start;
        while t < start + Duration::from_secs(2) {
            if c.try_send(64 << 10, 0, t) {
                sent += 64 << 10;
            }
            t += Duration::from_millis(1);
        }
        // ~2 s at 1 MiB/s plus at most one burst
        assert!(sent <= (2 << 20) + (128 << 10), "sent {sent}");
        assert!(sent >= (3 << 20) / 2, "sent {sent}");
    }

    #[test]
    fn application_writes_cap_the_rate_at_min_rate() {
        let mut c = RateController::new(RateSettings { max_rate: None, min_rate: 1 << 20 });
        let now = Instant::now();
        assert_eq!(c.cap(now), None);
        c.tick(4096, now);
        assert_eq!(c.cap(now), Some(1 << 20));
        assert_eq!(c.cap(now + BUSY_HOLD * 2), None);
    }

    #[test]
    fn window_opens_while_it_limits_and_the_rtt_holds() {
        let mut c = RateController::new(RateSettings::default());
        let mut now = Instant::now();
        for _ in 0..50 {
            assert!(!c.try_send(1 << 20, c.window(now), now));
            c.on_ack(50 << 20, Duration::from_millis(50));
            now += INTERVAL;
            c.tick(0, now);
        }
        // A long fat pipe: the window opens to the cap.
        assert_eq!(c.window(now), MAX_WINDOW);
    }

    #[test]
    fn window_shrinks_when_the_rtt_inflates() {
        let mut c = RateController::new(RateSettings::default());
        let mut now = Instant::now();
        c.on_ack(1 << 20, Duration::from_micros(200));
        for _ in 0..50 {
            c.on_ack(1 << 20, Duration::from_millis(5));
            now += INTERVAL;
            c.tick(0, now);
        }
        // 10 MB/s at a 200 µs base RTT: a BDP of 2 KB; queueing shrank the window to the floor.
        assert!(c.window(now) < MIN_WINDOW + (64 << 10), "{}", c.window(now));
    }
}
