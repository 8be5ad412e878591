//! The TLS configuration of every HTTPS client of the agent and of `fleet-sign` (channels, git
//! over HTTPS, the collector, HTTP health checks): the system's trust store (on NixOS
//! `security.pki`, through `/etc/ssl/certs`, or `SSL_CERT_FILE`) plus the certificates of an
//! operator's `ca_file` (a home forge, a company CA). Only a system without any trust store
//! (a minimal container) falls back to the compiled-in public roots, and says so.
//!
//! The roots are read once per process and CA file: building a client for a poll costs no
//! certificate parsing.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The client configuration for `ca_file` (or none), made on first use.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    static CONFIGS: OnceLock<Mutex<HashMap<Option<PathBuf>, Arc<rustls::ClientConfig>>>> =
        OnceLock::new();
    let mut configs = CONFIGS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = ca_file.map(Path::to_path_buf);
    if let Some(config) = configs.get(&key) {
        return Ok(config.as_ref().clone());
    }
    let config = Arc::new(make(ca_file)?);
    configs.insert(key, config.clone());
    Ok(config.as_ref().clone())
}

/// The certificates in a PEM file; an error when there are none.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file {} is not PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "ca_file {} holds no certificate (PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(certificates)
}

fn make(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        log::warn!(
            "no trust store on this system ({}): trusting the compiled-in public roots",
            native
                .errors
                .first()
                .map_or("no certificates found".to_owned(), ToString::to_string)
        );
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        for certificate in read_ca_file(path)? {
            roots
                .add(certificate)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Whether an HTTP client error is the server's certificate being refused (unknown issuer,
/// wrong name, expired): the `tls_untrusted` reason rather than an unreachable channel.
pub fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    // rustls' error reaches the client wrapped in io::Errors, whose `source()` skips what they
    // wrap: look inside each of them too.
    fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(rustls) = e.downcast_ref::<rustls::Error>() {
            return Some(rustls);
        }
        let io = e.downcast_ref::<std::io::Error>()?;
        let inner: &(dyn std::error::Error + 'static) = io.get_ref()?;
        rustls_error(inner).or_else(|| inner.source().and_then(rustls_error))
    }
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(rustls) = rustls_error(e) {
            return matches!(
                rustls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        source = e.source();
    }
    false
}
