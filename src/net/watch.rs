//! Files read again when they change (TLS certificates and keys, token verification keys): polled
//! every few seconds by comparing their bytes (no inotify: it misses files replaced through a
//! symlink swap, as Kubernetes mounts secrets). A reload that fails keeps what is in use; the
//! files are tried again at their next change (a certificate and its key written one after the
//! other load once both are there).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Polls `paths` every `every` until `cancel`; calls `reload` with all their contents when any
/// of them changed since the last look.
pub fn spawn<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    every: Duration,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    reload: F,
) where
    F: Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let read_all = |paths: Vec<PathBuf>| async move {
            let mut out = Vec::with_capacity(paths.len());
            for p in &paths {
                out.push(tokio::fs::read(p).await.ok());
            }
            out
        };
        let mut seen = read_all(paths.clone()).await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = read_all(paths.clone()).await;
            if now == seen {
                continue;
            }
            seen = now.clone();
            let files: Option<Vec<Vec<u8>>> = now.into_iter().collect();
            let result = match files {
                None => Err("a file cannot be read".to_string()),
                Some(files) => reload(&files),
            };
            let label = match &result {
                Ok(()) => {
                    tracing::info!(what, "reloaded");
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(what, error = %e, "reload failed; keeping the previous version");
                    "error"
                }
            };
            metrics
                .security
                .reloads
                .with_label_values(&[what, label])
                .inc();
        }
    });
}
