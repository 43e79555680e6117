//! Stop signals: Ctrl-C (SIGINT) and SIGTERM (what systemd and container
//! runtimes send) both ask for a graceful stop; a second one stops at once.

/// Completes at the first SIGINT or SIGTERM; from then on a second one
/// exits the process at once (status 130).
pub async fn stop_requested() {
    first_signal().await;
    tokio::spawn(async {
        first_signal().await;
        eprintln!("second stop signal: exiting now");
        std::process::exit(130);
    });
}

async fn first_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
