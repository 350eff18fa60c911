//! The livetable binary: parse configuration, install logging, run until SIGINT/SIGTERM.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;

// glibc malloc spent ~45% of ingest CPU (arena lock contention between the ingest thread, sled's
// and librdkafka's threads, and fragmentation): see BENCHMARKS.md
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Transparent huge pages turn every fresh or re-committed allocator page into a 2 MiB zeroing
    // fault: half of a 1M-row restore's CPU was clear_page_erms (BENCHMARKS.md). Opt out.
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag of the calling process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("livetable: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    let config = match livetable::config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("livetable: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        // colour codes only on a terminal: a log redirected to a file (dev/up's .run/logs) stays plain
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init();
    }
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            cancel.cancel();
        });
    }
    tracing::info!(brokers = %config.brokers, topics = ?config.topics, listen = %config.listen, data_dir = %config.data_dir.display(), "starting livetable");
    match livetable::run(config, cancel).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "livetable stopped with an error");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
