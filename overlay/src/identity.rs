//! Node identities: the cluster CA and node certificates (`ham cert`), and the TLS
//! configurations that make mutual TLS mandatory on the mesh.
//!
//! A node's name is the DNS name in its certificate. The TLS layer only proves the
//! chain to the cluster CA; binding a certificate to the name a peer claims is done
//! after the handshake by [`verify_peer_name`].

use crate::NodeName;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol the mesh speaks; a peer offering anything else is refused.
pub const ALPN: &[u8] = b"ham-mesh/1";

/// What can go wrong with certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file exists already and would be overwritten.
    #[error("{0} exists already; remove it first to replace it")]
    Exists(PathBuf),
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The CA's fixed parameters: node certificates name it as their issuer, so issuing
/// needs only its key (no certificate parser).
fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "ham cluster CA");
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "ham");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Writes `contents` to a new file with `mode`, refusing to overwrite.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists(path.to_path_buf())
            } else {
                io_err(path)(e)
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Creates a cluster CA: `DIR/ca.crt` and `DIR/ca.key` (mode 0600). Refuses to
/// overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<(PathBuf, PathBuf), IdentityError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(IdentityError::Exists(p.clone()));
        }
    }
    let kp = rcgen::KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&kp)?;
    write_new(&key, &kp.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key))
}

/// Issues node `name`'s certificate and key, signed by the CA in `dir`:
/// `DIR/NAME.crt` and `DIR/NAME.key` (mode 0600). The certificate serves both as a
/// server and as a client certificate, for the name only.
pub fn issue(dir: &Path, name: &NodeName) -> Result<(PathBuf, PathBuf), IdentityError> {
    let ca_key_path = dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_pem).map_err(|e| IdentityError::BadPem {
        path: ca_key_path.clone(),
        what: format!("not a CA key ({e}); run `ham cert init-ca --dir DIR` first"),
    })?;
    let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    for p in [&crt, &key] {
        if p.exists() {
            return Err(IdentityError::Exists(p.clone()));
        }
    }
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.as_str());
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let kp = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&kp, &issuer)?;
    write_new(&key, &kp.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key))
}

/// Where a node's certificate, key and cluster CA are.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// The node's certificate (PEM).
    pub cert: PathBuf,
    /// The node's private key (PEM).
    pub key: PathBuf,
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
}

/// A node's loaded identity, ready to build TLS configurations.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(io_err(path))
}

fn bad_pem(path: &Path, what: impl Into<String>) -> IdentityError {
    IdentityError::BadPem {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn certs_of(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, format!("unreadable certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad_pem(path, "no certificate in it"));
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Loads the files; every error names the file.
    pub fn load(files: &IdentityFiles) -> Result<TlsIdentity, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let chain = certs_of(&files.cert)?;
        let key_bytes = read_pem(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| bad_pem(&files.key, format!("no private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for c in certs_of(&files.ca)? {
            roots
                .add(c)
                .map_err(|e| bad_pem(&files.ca, format!("not a CA certificate: {e}")))?;
        }
        Ok(TlsIdentity {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    /// The names this node's own certificate is valid for include `name`.
    pub fn check_own_name(&self, name: &NodeName) -> Result<(), IdentityError> {
        verify_cert_name(&self.chain[0], name).map_err(IdentityError::Tls)
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))
    }

    /// The server side: a client certificate from the cluster CA is mandatory.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// The client side: presents this node's certificate and accepts a server whose
    /// chain leads to the cluster CA (its name is checked after the handshake).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let verifier = Arc::new(ClusterServerVerifier {
            inner: self.client_verifier()?,
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// The one crypto provider of the workspace (ring, as quinn uses).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a server's chain to the cluster CA, not its name: a seed is dialled by
/// address, and every node's name is checked against its certificate after the
/// handshake, the same way on both sides.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Node certificates carry both EKUs, so the client-certificate path (chain to
        // the cluster CA, clientAuth usage) proves a server's chain just as well.
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn verify_cert_name(cert: &CertificateDer<'_>, name: &NodeName) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let server_name = ServerName::try_from(name.as_str())
        .map_err(|e| format!("{name:?} is not a valid node name: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| format!("its certificate is not for node {name:?}"))
}

/// Checks that the peer of an established connection holds a certificate for the
/// name it claims. The chain was proven during the handshake.
pub fn verify_peer_name(conn: &quinn::Connection, claimed: &NodeName) -> Result<(), String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "no peer certificate".to_string())?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity".to_string())?;
    let cert = certs
        .first()
        .ok_or_else(|| "empty certificate chain".to_string())?;
    verify_cert_name(cert, claimed)
}
