//! Process signals: SIGTERM and SIGINT start a drain; SIGHUP asks `svidcar run` for a
//! config reload (other commands log and ignore it: by default it would kill the
//! process at once, with no drain).

use tokio::signal::unix::{signal, Signal as UnixSignal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGHUP: read the config again.
    Reload,
}

/// The signals a long-running command listens to, installed once (a handler installed
/// per wait could miss a signal sent in between).
pub struct Signals {
    term: Option<UnixSignal>,
    hup: Option<UnixSignal>,
}

impl Signals {
    pub fn new() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// The next signal.
    pub async fn next(&mut self) -> Request {
        async fn recv(s: &mut Option<UnixSignal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => Request::Stop,
            _ = tokio::signal::ctrl_c() => Request::Stop,
            _ = recv(&mut self.hup) => Request::Reload,
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits for SIGTERM or SIGINT; SIGHUP is logged and ignored (commands without reload).
pub async fn wait_for_signal() {
    let mut signals = Signals::new();
    loop {
        match signals.next().await {
            Request::Stop => return,
            Request::Reload => {
                tracing::warn!("SIGHUP received: this command does not reload; ignored (the process keeps running)")
            }
        }
    }
}
