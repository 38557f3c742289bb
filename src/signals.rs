//! Process signals: SIGTERM and SIGINT start a drain; SIGHUP is logged and ignored.

/// Waits for SIGTERM or SIGINT. SIGHUP, which by default would kill the process at
/// once with no drain, is logged and ignored until live reload exists.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hup.recv() => {
                tracing::warn!("SIGHUP received: live reload is not supported yet; ignored (the process keeps running)");
            }
        }
    }
}
