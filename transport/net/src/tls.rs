//! Cluster identity for QUIC: a cluster certificate authority, node certificates it issues,
//! and the mutual-TLS configurations built from them. A peer whose certificate was not issued
//! by the cluster CA is refused during the TLS handshake.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

/// The server name every node certificate carries and every dialer checks.
pub const CLUSTER_SERVER_NAME: &str = "phalanx.cluster";
/// ALPN protocol id of Phalanx links.
pub const ALPN: &[u8] = b"phalanx/1";

/// Why cluster credentials could not be made, read or used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A credentials file could not be read or written.
    #[error("credentials file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A credentials file is not valid PEM of the expected kind.
    #[error("credentials file {path} is not a valid PEM {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was expected in it.
        what: &'static str,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// A node's TLS credentials: the cluster CA it trusts and its own certificate and key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// The cluster CA certificate (the only trust root).
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

/// A cluster certificate authority (held by whoever provisions nodes: a launcher, a test).
pub struct ClusterCa {
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
    cert_pem: String,
}

/// Credentials of one node in PEM form, as written to disk.
struct IssuedPem {
    cert_pem: String,
    key_pem: String,
}

impl ClusterCa {
    /// Generates a fresh CA named `name`.
    pub fn generate(name: &str) -> Result<ClusterCa, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa { cert_pem: cert.pem(), cert: cert.der().clone(), params, key })
    }

    /// The CA certificate.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// Issues credentials for one node.
    pub fn issue(&self, node_name: &str) -> Result<TlsIdentity, TlsError> {
        Ok(self.issue_both(node_name)?.0)
    }

    fn issue_both(&self, node_name: &str) -> Result<(TlsIdentity, IssuedPem), TlsError> {
        let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node_name);
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let pem = IssuedPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        let id = TlsIdentity {
            ca: self.cert.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        };
        Ok((id, pem))
    }

    /// Writes `ca.pem` and, for each name, `NAME.cert.pem` and `NAME.key.pem` into `dir`.
    pub fn write_dir(&self, dir: &Path, node_names: &[String]) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::File { path: dir.display().to_string(), source })?;
        write_file(&dir.join("ca.pem"), &self.cert_pem)?;
        for name in node_names {
            let (_, pem) = self.issue_both(name)?;
            write_file(&dir.join(format!("{name}.cert.pem")), &pem.cert_pem)?;
            write_file(&dir.join(format!("{name}.key.pem")), &pem.key_pem)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::File { path: path.display().to_string(), source })
}

impl TlsIdentity {
    /// Reads `ca.pem`, `NAME.cert.pem` and `NAME.key.pem` from `dir` (as written by
    /// [`ClusterCa::write_dir`]).
    pub fn load_dir(dir: &Path, node_name: &str) -> Result<TlsIdentity, TlsError> {
        let read = |file: String, what: &'static str| -> Result<Vec<u8>, TlsError> {
            let path = dir.join(&file);
            std::fs::read(&path).map_err(|source| TlsError::File { path: path.display().to_string(), source }).and_then(
                |b| if b.is_empty() { Err(TlsError::Pem { path: path.display().to_string(), what }) } else { Ok(b) },
            )
        };
        let pem_err =
            |file: &str, what: &'static str| TlsError::Pem { path: dir.join(file).display().to_string(), what };
        let ca_file = "ca.pem".to_string();
        let ca = CertificateDer::from_pem_slice(&read(ca_file.clone(), "certificate")?)
            .map_err(|_| pem_err(&ca_file, "certificate"))?;
        let cert_file = format!("{node_name}.cert.pem");
        let cert = CertificateDer::from_pem_slice(&read(cert_file.clone(), "certificate")?)
            .map_err(|_| pem_err(&cert_file, "certificate"))?;
        let key_file = format!("{node_name}.key.pem");
        let key = PrivateKeyDer::from_pem_slice(&read(key_file.clone(), "private key")?)
            .map_err(|_| pem_err(&key_file, "private key"))?;
        Ok(TlsIdentity { ca, chain: vec![cert], key })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(roots))
    }

    /// A rustls server configuration that requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Self::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// A rustls client configuration that trusts only the cluster CA and presents this node's
    /// certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_through_pem_files() {
        let dir = std::env::temp_dir().join(format!("phalanx-tls-{}", std::process::id()));
        let ca = ClusterCa::generate("test cluster").unwrap();
        ca.write_dir(&dir, &["rank-0".to_string()]).unwrap();
        let id = TlsIdentity::load_dir(&dir, "rank-0").unwrap();
        assert_eq!(id.ca, ca.certificate());
        assert!(id.server_config().is_ok());
        assert!(id.client_config().is_ok());
        let missing = TlsIdentity::load_dir(&dir, "rank-9").unwrap_err();
        assert!(missing.to_string().contains("rank-9.cert.pem"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
