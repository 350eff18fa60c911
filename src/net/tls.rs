//! TLS with rustls: the certificate chain and key from PEM files (`--tls-cert`, `--tls-key`),
//! read again when they change. A new certificate applies to the next handshakes; connections
//! already open keep theirs. A pair that does not load (a key that is not the certificate's, a
//! file half written) keeps the pair in use.

use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
use tokio_rustls::TlsAcceptor;

use crate::config::security::TlsFiles;

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no certificate in PEM")]
    NoCertificate { path: String },
    #[error("{path}: no private key in PEM ({reason})")]
    NoKey { path: String, reason: String },
    #[error("the certificate and key cannot be used: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's TLS settings, replaced when the files change.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Loads the pair (a start-up error when it does not load).
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let config = server_config(files, &read(&files.cert)?, &read(&files.key)?)?;
        Ok(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the pair again whenever one of the files changes, until `cancel`.
    pub fn watch(
        self: &Arc<Self>,
        every: std::time::Duration,
        cancel: tokio_util::sync::CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let me = self.clone();
        super::watch::spawn(
            "tls",
            vec![self.files.cert.clone(), self.files.key.clone()],
            every,
            cancel,
            metrics,
            move |files: &[Vec<u8>]| me.replace(&files[0], &files[1]).map_err(|e| e.to_string()),
        );
    }

    /// Installs the pair from these file contents.
    pub fn replace(&self, cert: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let config = server_config(&self.files, cert, key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }
}

fn server_config(
    files: &TlsFiles,
    cert: &[u8],
    key: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::NoKey {
        path: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // HTTP/1.1 only: WebSocket upgrades and SSE are HTTP/1.1 here
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
