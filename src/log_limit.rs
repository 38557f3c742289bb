//! Log lines that other parties can cause (refused handshakes from unauthenticated peers,
//! SDS NACKs) and text they control: escaped so it cannot forge log lines, truncated so
//! it cannot flood the log, and rate-limited per reason with a summary line that says how
//! many were left out. Metrics still count every event; only the log lines are limited.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` lines per key and window; the rest are counted, and the window's end
/// brings one summary line for them.
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
    summary_pending: bool,
}

impl LogLimiter {
    /// `what` names the lines in the summary ("handshake rejected").
    pub const fn new(what: &'static str, burst: u32, window: Duration) -> Self {
        Self {
            what,
            burst,
            window,
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line for `key` may be logged now. The first line left out in a window
    /// schedules the summary for the window's end, so a burst that stops is still reported.
    pub fn allow(&'static self, key: &'static str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(key).or_insert(Bucket {
            start: now,
            logged: 0,
            suppressed: 0,
            summary_pending: false,
        });
        if now.duration_since(b.start) >= self.window {
            b.start = now;
            b.logged = 0;
        }
        if b.logged < self.burst {
            b.logged += 1;
            return true;
        }
        b.suppressed += 1;
        if !b.summary_pending {
            b.summary_pending = true;
            let at = b.start + self.window;
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(async move {
                        tokio::time::sleep_until(at.into()).await;
                        self.summarise(key);
                    });
                }
                // No runtime (never the case in the servers): report at once.
                Err(_) => {
                    drop(buckets);
                    self.summarise(key);
                }
            }
        }
        false
    }

    fn summarise(&self, key: &'static str) {
        let suppressed = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = buckets.get_mut(key) else {
                return;
            };
            b.summary_pending = false;
            std::mem::take(&mut b.suppressed)
        };
        if suppressed > 0 {
            tracing::warn!(
                reason = key,
                suppressed,
                "{}: {suppressed} more log lines suppressed in the last {}s (metrics count every one)",
                self.what,
                self.window.as_secs()
            );
        }
    }
}

/// `text` with control characters, backslashes and invisible or direction-changing
/// characters escaped (one line, whatever it holds; quotes are kept as they are), cut at
/// `max` bytes with a note of the original length.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (i, c) in text.char_indices() {
        let before = out.len();
        if c == '\'' || c == '"' {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
        if out.len() > max {
            out.truncate(before);
            out.push_str(&format!(
                "… [truncated, {} of {} bytes shown]",
                i,
                text.len()
            ));
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key_and_counts_the_rest() {
        static L: LogLimiter = LogLimiter::new("test", 3, Duration::from_secs(3600));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let allowed = (0..10).filter(|_| L.allow("a")).count();
        assert_eq!(allowed, 3);
        // Another key has its own budget.
        assert!(L.allow("b"));
        let buckets = L.buckets.lock().unwrap();
        assert_eq!(buckets["a"].suppressed, 7);
        assert!(buckets["a"].summary_pending);
    }

    #[test]
    fn a_new_window_resets_the_budget() {
        static L: LogLimiter = LogLimiter::new("test", 1, Duration::from_millis(1));
        assert!(L.allow("a"));
        // No runtime here: the summary is written at once.
        assert!(!L.allow("a"));
        assert_eq!(L.buckets.lock().unwrap()["a"].suppressed, 0);
        std::thread::sleep(Duration::from_millis(5));
        assert!(L.allow("a"));
    }

    #[test]
    fn escaped_and_truncated() {
        let forged = "bad cert\n2026-01-01T00:00:00Z  INFO svidcar: all good\r\u{1b}[31m\"";
        let p = printable(forged, 512);
        assert!(!p.contains('\n') && !p.contains('\r') && !p.contains('\u{1b}'));
        assert!(p.starts_with("bad cert\\n2026"), "{p}");
        let big = "x".repeat(900 * 1024);
        let p = printable(&big, 512);
        assert!(p.len() < 512 + 64, "{}", p.len());
        assert!(p.ends_with("[truncated, 512 of 921600 bytes shown]"), "{p}");
        // Never cuts inside a character or an escape.
        let p = printable(&"é\n".repeat(400), 20);
        assert!(p.starts_with("é\\né\\n"), "{p}");
        assert_eq!(printable("short", 512), "short");
        assert_eq!(printable("exec'd \"x\" a\\b", 512), "exec'd \"x\" a\\\\b");
        assert_eq!(
            printable("a\u{2028}b\u{202e}c", 512),
            "a\\u{2028}b\\u{202e}c"
        );
    }
}
