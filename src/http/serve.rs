//! The listeners. An accept loop instead of `axum::serve` so that a public port has the limits
//! it needs: a cap on connections (at the cap, nothing more is accepted until one closes), a
//! deadline for request headers (and for the TLS handshake), and optional TLS whose
//! certificate is reloaded when its files change (cert-manager rotates them).
//!
//! HTTP/1.1 only: hyper's HTTP/2 server has no header-read deadline, and the protocol sniffing
//! that serves both waits for a client's first bytes without any, so an idle client would hold
//! a connection slot forever.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for a new certificate.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// How long requests in flight may finish after shutdown, before connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Deadline for a request's headers (the first and every later one on a connection), and
    /// for the TLS handshake.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// TLS for a listener: the certificate and key files, reloaded when they change.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    /// Loads the PEM files now (an error stops startup) and rereads them every few seconds
    /// until `shutdown`.
    pub fn load(cert: &Path, key: &Path, shutdown: CancellationToken) -> Result<Self, String> {
        let files = (cert.to_owned(), key.to_owned());
        let (bytes, loaded) = read_pair(&files)?;
        let certificate = Arc::new(ReloadingCertificate {
            current: ArcSwap::from_pointee(loaded),
            files,
        });
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio::spawn(certificate.watch(bytes, shutdown));
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// The certificate presented now; swapped in place when the files change.
struct ReloadingCertificate {
    current: ArcSwap<CertifiedKey>,
    files: (PathBuf, PathBuf),
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCertificate {
    /// Polls the paths (not open handles: cert-manager swaps symlinks) and swaps in a new
    /// certificate when their content changes; a pair that does not load keeps the old one.
    async fn watch(self: Arc<Self>, mut seen: (Vec<u8>, Vec<u8>), shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.reload(&mut seen);
        }
    }

    /// One look at the files: a changed pair that loads replaces the certificate.
    fn reload(&self, seen: &mut PemPair) {
        let now = match (std::fs::read(&self.files.0), std::fs::read(&self.files.1)) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, files = ?self.files, "cannot read the TLS certificate files; still serving the previous certificate");
                return;
            }
        };
        if now == *seen {
            return;
        }
        match certified_key(&now.0, &now.1) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                tracing::info!(files = ?self.files, "TLS certificate reloaded");
            }
            // Remembered as seen either way: a half-written pair is retried when it changes
            // again, without an error every few seconds meanwhile.
            Err(e) => {
                tracing::error!(error = %e, files = ?self.files, "the new TLS certificate does not load; still serving the previous one")
            }
        }
        *seen = now;
    }
}

type PemPair = (Vec<u8>, Vec<u8>);

fn read_pair(files: &(PathBuf, PathBuf)) -> Result<(PemPair, CertifiedKey), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let (cert, key) = (read(&files.0)?, read(&files.1)?);
    let loaded = certified_key(&cert, &key)?;
    Ok(((cert, key), loaded))
}

/// A certificate chain and its private key, both PEM, checked to belong together.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no PEM private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &ring::default_provider())
        .map_err(|e| format!("the certificate and key do not go together: {e}"))
}

/// Serves `router` on `listener` until `shutdown` fires, then lets requests in flight finish
/// (for at most a few seconds).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "listening");
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        // At the cap, stop accepting: further clients wait in the kernel's backlog.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let _ = watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
                Some(tls) => {
                    let handshake = tls.acceptor.accept(stream);
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(limits.header_read_timeout, handshake).await
                    else {
                        return;
                    };
                    let _ = watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_loads_only_with_its_own_key() {
        let (cert, key) = pair("localhost");
        let (_, other_key) = pair("localhost");
        assert!(certified_key(cert.as_bytes(), key.as_bytes()).is_ok());
        let mismatch = certified_key(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(mismatch.contains("do not go together"), "{mismatch}");
        assert!(certified_key(b"", key.as_bytes()).is_err());
        assert!(certified_key(cert.as_bytes(), b"junk").is_err());
    }

    #[test]
    fn a_rotation_is_taken_and_a_broken_pair_keeps_the_old_certificate() {
        let dir = std::env::temp_dir().join(format!("hookrelay-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |(cert, key): &(String, String)| {
            std::fs::write(&files.0, cert).unwrap();
            std::fs::write(&files.1, key).unwrap();
        };
        let (first, second) = (pair("localhost"), pair("localhost"));
        write(&first);
        let (mut seen, loaded) = read_pair(&files).unwrap();
        let reloading = ReloadingCertificate {
            current: ArcSwap::from_pointee(loaded),
            files: files.clone(),
        };
        let presented = || reloading.current.load().cert[0].to_vec();
        let der = |(cert, _): &(String, String)| {
            CertificateDer::from_pem_slice(cert.as_bytes())
                .unwrap()
                .to_vec()
        };
        reloading.reload(&mut seen);
        assert_eq!(presented(), der(&first));
        // Half-way through a rotation: the new key beside the old certificate.
        std::fs::write(&files.1, &second.1).unwrap();
        reloading.reload(&mut seen);
        assert_eq!(presented(), der(&first), "a mismatched pair was taken");
        std::fs::write(&files.0, "garbage").unwrap();
        reloading.reload(&mut seen);
        assert_eq!(presented(), der(&first), "a broken file was taken");
        write(&second);
        reloading.reload(&mut seen);
        assert_eq!(presented(), der(&second), "the rotation was not taken");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
