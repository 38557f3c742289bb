//! Rate limits for log lines that other parties can cause (refused handshakes from
//! unauthenticated peers), so that an attacker cannot flood the log. Counting stays exact
//! in the metrics; only the log lines are limited, per reason, with a summary line that
//! says how many were left out.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per key and window; the rest are counted and summarised.
pub struct LogLimiter {
    what: &'static str,
    burst: u32,
    window: Duration,
    buckets: Mutex<BTreeMap<&'static str, Bucket>>,
}

struct Bucket {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// `what` names the lines in the summary ("handshake rejections").
    pub const fn new(what: &'static str, burst: u32, window: Duration) -> Self {
        Self {
            what,
            burst,
            window,
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line for `key` may be logged now. A new window first reports what the
    /// previous one left out.
    pub fn allow(&self, key: &'static str) -> bool {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let b = buckets.entry(key).or_insert(Bucket {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(b.start) >= self.window {
            self.summarise(key, b);
            b.start = now;
            b.logged = 0;
        }
        if b.logged < self.burst {
            b.logged += 1;
            true
        } else {
            b.suppressed += 1;
            false
        }
    }

    /// Logs the summary of every window that has ended with lines left out. Called
    /// periodically, so a burst that stops is still reported.
    pub fn flush(&self) {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        for (key, b) in buckets.iter_mut() {
            if now.duration_since(b.start) >= self.window {
                self.summarise(key, b);
            }
        }
        buckets.retain(|_, b| now.duration_since(b.start) < self.window || b.suppressed > 0);
    }

    fn summarise(&self, key: &str, b: &mut Bucket) {
        if b.suppressed > 0 {
            tracing::warn!(
                reason = key,
                suppressed = b.suppressed,
                "{}: {} more log lines suppressed in the last {:?} (metrics count every one)",
                self.what,
                b.suppressed,
                self.window
            );
            b.suppressed = 0;
        }
    }

    /// How often [`LogLimiter::flush`] should run.
    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key_and_counts_the_rest() {
        let l = LogLimiter::new("test", 3, Duration::from_secs(3600));
        let allowed = (0..10).filter(|_| l.allow("a")).count();
        assert_eq!(allowed, 3);
        // Another key has its own budget.
        assert!(l.allow("b"));
        let buckets = l.buckets.lock().unwrap();
        assert_eq!(buckets["a"].suppressed, 7);
    }

    #[test]
    fn a_new_window_resets_the_budget() {
        let l = LogLimiter::new("test", 1, Duration::from_millis(1));
        assert!(l.allow("a"));
        assert!(!l.allow("a"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.allow("a"));
        assert_eq!(l.buckets.lock().unwrap()["a"].suppressed, 0);
    }
}
