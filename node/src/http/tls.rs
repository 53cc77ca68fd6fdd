//! TLS for the HTTP API and the automerge-repo WebSocket endpoint (rustls).
//!
//! The node reads a PEM certificate chain and a PEM private key (PKCS#8,
//! PKCS#1 or SEC1) and serves TLS 1.2 and 1.3 with rustls' safe defaults,
//! offering ALPN `http/1.1`. The pair is read again on SIGHUP and whenever
//! either file changes (looked at every [`RELOAD_POLL`]): new connections
//! get the new certificate, connections open keep theirs. A pair that does
//! not load (a key that does not match the certificate, a file half
//! written by a renewal) is logged and counted, and the certificate in use
//! stays until both files make a valid pair.
//!
//! Plain HTTP is served only on a loopback address, unless the settings
//! name it (`http.insecure_plaintext`): tokens and documents would cross
//! the network in cleartext.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::guarded_file::{self, poll_until_closing, stamp, Stamp};

pub use crate::guarded_file::RELOAD_POLL;

/// Where the certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the node's certificate first.
    pub cert: PathBuf,
    /// PEM private key of the certificate (only its owner may read it).
    pub key: PathBuf,
}

/// Why the certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("TLS file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Others than its owner may read the key file.
    #[error("TLS key file {path} has mode {mode:o}; others must not read it (chmod 600)")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A file does not hold what it should.
    #[error("TLS file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate, or rustls refuses it.
    #[error("TLS certificate {cert} and key {key} do not make a pair: {reason}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

/// The certificate in use, read again when its files change.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, Option<PairStamp>)>,
    /// Times a changed pair was loaded.
    pub reloads: AtomicU64,
    /// Times loading a changed pair failed (the one in use stayed).
    pub reload_failures: AtomicU64,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(Arc::clone(&current.0))
    }
}

/// The stamps of the certificate and key files.
type PairStamp = (Stamp, Stamp);

fn stamps(files: &TlsFiles) -> Option<PairStamp> {
    Some((stamp(&files.cert)?, stamp(&files.key)?))
}

impl CertStore {
    /// Reads the pair at `files`; an error if it does not load.
    pub fn open(files: TlsFiles) -> Result<Arc<CertStore>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = stamps(&files);
        let key = load_pair(&files, &provider)?;
        Ok(Arc::new(CertStore {
            files,
            provider,
            current: RwLock::new((Arc::new(key), seen)),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    /// The files served.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the pair again if either file changed (or if `force`).
    /// `None`: nothing changed; otherwise whether it loaded (on an error
    /// the pair in use stays).
    pub fn reload(&self, force: bool) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        {
            let current = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && now == current.1 {
                return None;
            }
        }
        let loaded = load_pair(&self.files, &self.provider);
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked at again only when a file changes once more.
        current.1 = now;
        Some(match loaded {
            Ok(key) => {
                current.0 = Arc::new(key);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        })
    }

    /// [`reload`](Self::reload), logging the outcome.
    pub fn reload_and_log(&self, force: bool) {
        match self.reload(force) {
            None => {}
            Some(Ok(())) => info!(cert = %self.files.cert.display(), "TLS certificate loaded"),
            Some(Err(e)) => {
                warn!(error = %e, "the TLS certificate could not be loaded; the one in use stays")
            }
        }
    }

    /// Reloads on change every [`RELOAD_POLL`] until `closing` turns true.
    pub async fn watch(self: Arc<Self>, closing: tokio::sync::watch::Receiver<bool>) {
        poll_until_closing(closing, || self.reload_and_log(false)).await;
    }

    /// An acceptor serving the certificate in use at each handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: self.files.cert.clone(),
                key: self.files.key.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = fs::read(&files.cert).map_err(|source| TlsError::Io {
        path: files.cert.clone(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid(&files.cert, "holds no PEM certificate".into()));
    }
    let key_pem =
        guarded_file::read(&files.key, guarded_file::OTHERS_ANY).map_err(|e| match e {
            guarded_file::Refused::Io(source) => TlsError::Io {
                path: files.key.clone(),
                source,
            },
            guarded_file::Refused::Mode(mode) => TlsError::KeyPermissions {
                path: files.key.clone(),
                mode,
            },
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid(&files.key, format!("no PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}
