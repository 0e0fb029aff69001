//! TLS (protocol §14), with rustls and its ring provider: the listener's
//! certificate (read, checked, and swapped on SIGHUP without touching open
//! connections) and the roots the upstream client trusts.
//!
//! Every start-up error names the file and the reason: unreadable, no
//! certificate or key in it, a certificate that does not match its key,
//! one that has expired or is not valid yet.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::OffsetDateTime;

/// Why a certificate, a key or a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file cannot be read.
    #[error("{}: cannot read it: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// No PEM `CERTIFICATE` block in the file.
    #[error("{}: no certificate found (expected PEM `-----BEGIN CERTIFICATE-----` blocks){}", .path.display(), .detail)]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said, if anything (with a leading `: `).
        detail: String,
    },
    /// No private key in the file, or one rustls cannot use.
    #[error("{}: {reason}", .path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// No key, or why it cannot be used.
        reason: String,
    },
    /// The certificate and the key are not a pair.
    #[error(
        "{} and {}: the certificate does not match the private key \
         (is one of them from another pair?)",
        .cert.display(), .key.display()
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate is out of its validity period.
    #[error("{}: the certificate {reason}", .path.display())]
    Validity {
        /// The certificate file.
        path: PathBuf,
        /// `expired on …` or `is not valid before …`.
        reason: String,
    },
    /// rustls refused the settings.
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates in a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(TlsError::NoCertificate {
            path: path.to_owned(),
            detail: String::new(),
        }),
        Err(e) => Err(TlsError::NoCertificate {
            path: path.to_owned(),
            detail: format!(": {e}"),
        }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a CA file for the stores (`store_ca`): the PEM bytes, once
/// checked to hold at least one certificate.
///
/// # Errors
///
/// [`TlsError::Read`] or [`TlsError::NoCertificate`], naming the file.
pub fn read_ca_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_certs(path)?;
    read(path)
}

/// Reads and checks the listener's certificate chain and key.
///
/// # Errors
///
/// A [`TlsError`] naming the file and the reason.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert)?;
    let key_pem = read(key)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: format!(
            "no private key found ({e}; expected a PEM `PRIVATE KEY`, \
             `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)"
        ),
    })?;
    let signer = ring::sign::any_supported_type(&der).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: format!("the private key cannot be used: {e}"),
    })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
    }
    if let Some(first) = certified.cert.first() {
        check_validity(cert, first, OffsetDateTime::now_utc())?;
    }
    Ok(Arc::new(certified))
}

fn check_validity(
    path: &Path,
    cert: &CertificateDer<'_>,
    now: OffsetDateTime,
) -> Result<(), TlsError> {
    // A certificate whose dates cannot be read is left to the clients.
    let Some((not_before, not_after)) = validity(cert.as_ref()) else {
        return Ok(());
    };
    let reason = if now > not_after {
        format!("expired on {}", format_utc(not_after))
    } else if now < not_before {
        format!("is not valid before {}", format_utc(not_before))
    } else {
        return Ok(());
    };
    Err(TlsError::Validity {
        path: path.to_owned(),
        reason,
    })
}

/// What `idem serve --check` says of the TLS files, once each is read and
/// checked as start-up would.
///
/// # Errors
///
/// The first [`TlsError`], naming the file and the reason.
pub fn check_files(files: &crate::config::TlsFiles) -> Result<Vec<String>, TlsError> {
    let mut lines = Vec::new();
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        let certified = certified_key(cert, key)?;
        let until = certified
            .cert
            .first()
            .and_then(|c| validity(c.as_ref()))
            .map_or_else(String::new, |(_, after)| {
                format!(", valid until {}", format_utc(after))
            });
        lines.push(format!(
            "tls check: {} and {} match{until}",
            cert.display(),
            key.display()
        ));
    }
    for ca in [&files.upstream_ca, &files.store_ca].into_iter().flatten() {
        let n = read_certs(ca)?.len();
        lines.push(format!(
            "tls check: {} holds {n} certificate(s)",
            ca.display()
        ));
    }
    Ok(lines)
}

/// The listener's certificate, swapped whole by [`ListenerTls::reload`]:
/// each handshake reads the current one, so a reload reaches new
/// connections and leaves open ones alone.
struct Current(RwLock<Arc<CertifiedKey>>);

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Current(..)")
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// TLS on the listener: `tls_cert` and `tls_key`, ALPN `h2` then
/// `http/1.1`.
#[derive(Clone)]
pub struct ListenerTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Reads and checks `cert` and `key`.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file and the reason.
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let current = Arc::new(Current(RwLock::new(certified_key(cert, key)?)));
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the files again; on success, new connections get the new
    /// certificate. On failure the old one stays.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert, &self.key)?;
        *self
            .current
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The acceptor for new connections.
    pub(super) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reloads on every SIGHUP until `stop` (Unix only; elsewhere, never).
    pub(super) fn reload_on_sighup(self, stop: tokio_util::sync::CancellationToken) {
        #[cfg(unix)]
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP: the certificate will not be reloaded");
                return;
            };
            loop {
                tokio::select! {
                    got = hangups.recv() => if got.is_none() { return },
                    () = stop.cancelled() => return,
                }
                match self.reload() {
                    Ok(()) => tracing::info!(
                        cert = %self.cert.display(),
                        "SIGHUP: TLS certificate reloaded; new connections use it"
                    ),
                    Err(error) => tracing::error!(
                        %error,
                        "SIGHUP: TLS certificate not reloaded; the previous one stays in use"
                    ),
                }
            }
        });
        #[cfg(not(unix))]
        drop((self, stop));
    }
}

/// The upstream client's TLS settings: the system's roots (the OS store,
/// read by rustls-native-certs), plus the certificates in `ca` if given.
/// No ALPN here: the connector offers `http/1.1`.
///
/// # Errors
///
/// [`TlsError`] for an unusable `ca` file, or when there is no root at all.
pub fn upstream_client_config(ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "a system root certificate could not be read");
    }
    let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca {
        for cert in read_certs(ca)? {
            roots.add(cert).map_err(|e| TlsError::NoCertificate {
                path: ca.to_owned(),
                detail: format!(": {e}"),
            })?;
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A certificate's validity period (notBefore, notAfter), read with
/// x509-parser; `None` when the certificate cannot be parsed.
fn validity(cert: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = parsed.validity();
    Some((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// `2026-12-02 05:13:19 UTC`.
fn format_utc(t: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.to_offset(time::UtcOffset::UTC)
        .format(format)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        (params.self_signed(&key).expect("a certificate"), key)
    }

    fn files(dir: &Path, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert).expect("write");
        std::fs::write(&k, key).expect("write");
        (c, k)
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "idem-tls-unit-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn start_up_errors_name_the_file_and_the_reason() {
        let dir = tempdir("errors");
        let (good, good_key) = pair((2020, 1, 1), (2090, 1, 1));
        let (c, k) = files(&dir, &good.pem(), &good_key.serialize_pem());
        ListenerTls::new(&c, &k).expect("a good pair");

        let missing = dir.join("nope.pem");
        let e = ListenerTls::new(&missing, &k).expect_err("unreadable");
        assert!(e.to_string().contains("nope.pem: cannot read it"), "{e}");

        let (c2, k2) = files(&dir, &good.pem(), "not a key\n");
        let e = ListenerTls::new(&c2, &k2).expect_err("no key");
        assert!(
            e.to_string().contains("key.pem: no private key found"),
            "{e}"
        );

        let (c3, k3) = files(&dir, "nothing here\n", &good_key.serialize_pem());
        let e = ListenerTls::new(&c3, &k3).expect_err("no certificate");
        assert!(
            e.to_string().contains("cert.pem: no certificate found"),
            "{e}"
        );

        let (_, other_key) = pair((2020, 1, 1), (2090, 1, 1));
        let (c4, k4) = files(&dir, &good.pem(), &other_key.serialize_pem());
        let e = ListenerTls::new(&c4, &k4).expect_err("mismatch");
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e:?}");
        assert!(
            e.to_string().contains("does not match the private key"),
            "{e}"
        );

        let (old, old_key) = pair((2000, 1, 1), (2001, 1, 1));
        let (c5, k5) = files(&dir, &old.pem(), &old_key.serialize_pem());
        let e = ListenerTls::new(&c5, &k5).expect_err("expired");
        assert!(
            e.to_string()
                .contains("cert.pem: the certificate expired on 2001-01-01"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn validity_dates_are_read_and_printed() {
        let (cert, _) = pair((2026, 12, 2), (2050, 1, 1));
        let (before, after) = validity(cert.der()).expect("dates");
        assert_eq!(format_utc(before), "2026-12-02 00:00:00 UTC");
        assert_eq!(format_utc(after), "2050-01-01 00:00:00 UTC");
        assert_eq!(after.unix_timestamp(), 2_524_608_000);
        assert!(validity(b"bad").is_none());
        let t = OffsetDateTime::from_unix_timestamp(1_796_188_399).expect("a date");
        assert_eq!(format_utc(t), "2026-12-02 05:13:19 UTC");

        let e = check_validity(
            Path::new("c.pem"),
            cert.der(),
            before - time::Duration::SECOND,
        )
        .expect_err("not yet valid");
        assert!(
            e.to_string()
                .contains("c.pem: the certificate is not valid before 2026-12-02 00:00:00 UTC"),
            "{e}"
        );
        check_validity(Path::new("c.pem"), cert.der(), before).expect("valid");
    }

    #[test]
    fn a_failed_reload_keeps_the_old_certificate() {
        let dir = tempdir("reload");
        let (a, a_key) = pair((2020, 1, 1), (2090, 1, 1));
        let (c, k) = files(&dir, &a.pem(), &a_key.serialize_pem());
        let tls = ListenerTls::new(&c, &k).expect("a good pair");
        let before = tls.current.0.read().expect("lock").cert.clone();
        std::fs::write(&k, "garbage").expect("write");
        assert!(tls.reload().is_err());
        assert_eq!(tls.current.0.read().expect("lock").cert, before);
        let (b, b_key) = pair((2020, 1, 1), (2090, 1, 1));
        files(&dir, &b.pem(), &b_key.serialize_pem());
        tls.reload().expect("a new pair");
        assert_ne!(tls.current.0.read().expect("lock").cert, before);
        let _ = std::fs::remove_dir_all(dir);
    }
}
