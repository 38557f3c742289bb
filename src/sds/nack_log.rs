//! Logging text that SDS clients control (NACK messages, node ids): escaped so it
//! cannot forge log lines, truncated so it cannot flood the log, and NACK lines
//! rate-limited with a summary of what was left out. Every NACK is still counted in
//! `svidcar_sds_requests_total{kind="nack"}`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest NACK text logged, in bytes of escaped output.
pub const MAX_NACK_BYTES: usize = 512;
/// Longest node id logged.
pub const MAX_NODE_BYTES: usize = 128;
/// NACK lines logged at most per window; the rest are summed up at the window's end.
const LINES_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(5);

/// `text` with control characters and quotes escaped (one line, whatever it holds),
/// cut at `max` bytes with a note of the original length.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (i, c) in text.char_indices() {
        let before = out.len();
        out.extend(c.escape_debug());
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

struct Limiter {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    summary_pending: bool,
}

static LIMITER: Mutex<Limiter> = Mutex::new(Limiter {
    window_start: None,
    logged: 0,
    suppressed: 0,
    summary_pending: false,
});

enum Verdict {
    Log,
    /// Suppressed; the first suppression of a window schedules the summary at its end.
    Suppress {
        summary_at: Option<Instant>,
    },
}

fn admit(now: Instant) -> Verdict {
    let mut l = LIMITER.lock().unwrap_or_else(|p| p.into_inner());
    let start = match l.window_start {
        Some(s) if now.duration_since(s) < WINDOW => s,
        _ => {
            l.window_start = Some(now);
            l.logged = 0;
            now
        }
    };
    if l.logged < LINES_PER_WINDOW {
        l.logged += 1;
        return Verdict::Log;
    }
    l.suppressed += 1;
    if l.summary_pending {
        return Verdict::Suppress { summary_at: None };
    }
    l.summary_pending = true;
    Verdict::Suppress {
        summary_at: Some(start + WINDOW),
    }
}

fn write_summary() {
    let suppressed = {
        let mut l = LIMITER.lock().unwrap_or_else(|p| p.into_inner());
        l.summary_pending = false;
        std::mem::take(&mut l.suppressed)
    };
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "SDS NACK log lines suppressed: {suppressed} NACKs in the last {}s were not logged (all are counted in svidcar_sds_requests_total{{kind=\"nack\"}})",
            WINDOW.as_secs()
        );
    }
}

/// Logs one NACK (escaped, truncated, rate-limited). `node` is already [`printable`]
/// (the stream keeps its node id that way for every line it logs).
pub fn log_nack(node: &str, message: &str) {
    match admit(Instant::now()) {
        Verdict::Log => tracing::warn!(
            node = %node,
            error = %printable(message, MAX_NACK_BYTES),
            "Envoy rejected SDS response (NACK)"
        ),
        Verdict::Suppress { summary_at: None } => {}
        Verdict::Suppress {
            summary_at: Some(at),
        } => match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    write_summary();
                });
            }
            // No runtime (never the case in the server): report at once.
            Err(_) => write_summary(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_and_truncated() {
        let forged = "bad cert\n2026-01-01T00:00:00Z  INFO svidcar: all good\r\u{1b}[31m\"";
        let p = printable(forged, MAX_NACK_BYTES);
        assert!(!p.contains('\n') && !p.contains('\r') && !p.contains('\u{1b}'));
        assert!(p.starts_with("bad cert\\n2026"), "{p}");
        let big = "x".repeat(900 * 1024);
        let p = printable(&big, MAX_NACK_BYTES);
        assert!(p.len() < MAX_NACK_BYTES + 64, "{}", p.len());
        assert!(p.ends_with("[truncated, 512 of 921600 bytes shown]"), "{p}");
        // Never cuts inside a character or an escape.
        let p = printable(&"é\n".repeat(400), 20);
        assert!(p.starts_with("é\\né\\n"), "{p}");
        assert_eq!(printable("short", 512), "short");
    }
}
