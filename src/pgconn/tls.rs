//! TLS with rustls (`ring` provider): the client configuration for a
//! [`TlsSettings`], the certificate verifier, errors that name the fix, the
//! `tls-server-end-point` channel-binding hash, and the connector
//! tokio-postgres uses ([`MakeRustls`]).
//!
//! # Verification
//!
//! One verifier, `PgVerifier`, covers every mode: with no root certificate
//! (`prefer`, `require`) any server certificate is accepted — the handshake
//! signature is still checked, so the server holds the certificate's key, but
//! nothing says the certificate is the right one; with a root certificate the
//! chain must end at one of its CAs (webpki: validity period, key usage,
//! signatures); `verify-full` also checks the host name against the
//! certificate's DNS and IP subject alternative names. rustls accepts TLS 1.2
//! and 1.3, as PostgreSQL does.
//!
//! # Channel binding
//!
//! `tls-server-end-point` (RFC 5929) is the hash of the server's certificate
//! with the hash function of the certificate's signature algorithm, SHA-256
//! when that is MD5 or SHA-1 — what PostgreSQL computes. The signature
//! algorithm is read from the certificate's DER by a small bounds-checked walk
//! (`signature_hash`); for algorithms without a fixed hash (Ed25519,
//! RSA-PSS) there is no binding and SCRAM goes without it, as libpq does.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{SslMode, TlsSettings};

/// Why TLS could not be set up. Every variant but [`TlsError::Io`] is
/// definite: the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server answered the SSLRequest with `N`.
    #[error(
        "server does not support TLS (it refused the SSLRequest), and sslmode={0} requires it: turn on ssl in \
         the server's postgresql.conf, or use sslmode=prefer or sslmode=disable"
    )]
    NotSupported(SslMode),
    /// `sslrootcert` cannot be read.
    #[error("cannot read sslrootcert={}: {source}; check the path and that walcast may read the file", .path.display())]
    RootCertUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `sslrootcert` holds no usable certificate.
    #[error("sslrootcert={} holds no usable PEM certificate ({reason}); it must hold the CA certificate(s) that signed the server's certificate", .path.display())]
    RootCertInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The chain does not end at a CA of `sslrootcert`.
    #[error(
        "server certificate is not signed by the CA in sslrootcert={}; check the file (it must hold the CA that \
         issued the server's certificate, or that CA's root) or use sslmode=require to connect without \
         verification",
        .0.display()
    )]
    UnknownIssuer(PathBuf),
    /// `verify-full`: the certificate does not name the host.
    #[error(
        "server certificate is not valid for host {host:?} (it names {presented}); sslmode=verify-full checks the \
         host name: connect using a name the certificate lists, or use sslmode=verify-ca to check only the chain"
    )]
    WrongHost {
        /// The host connected to.
        host: String,
        /// The names in the certificate, as far as known.
        presented: String,
    },
    /// Expired or not yet valid.
    #[error("server certificate is outside its validity period ({0}); renew the server's certificate")]
    Validity(String),
    /// Any other certificate problem.
    #[error("server certificate rejected: {0}")]
    BadCertificate(String),
    /// The host cannot be used as a TLS server name.
    #[error("host {0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    BadServerName(String),
    /// The handshake failed for another reason (alert, protocol).
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The socket failed during negotiation or the handshake.
    #[error("TLS negotiation I/O: {0}")]
    Io(io::Error),
}

impl TlsError {
    /// Whether reconnecting may help (only I/O failures).
    pub fn is_transient(&self) -> bool {
        matches!(self, TlsError::Io(_))
    }

    /// Turns a handshake failure into the error that names the fix.
    fn classify(err: io::Error, settings: &TlsSettings, host: &str) -> TlsError {
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return TlsError::Io(err);
        };
        match tls {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => {
                    TlsError::UnknownIssuer(settings.root_cert.clone().unwrap_or_default())
                }
                CertificateError::NotValidForName => {
                    TlsError::WrongHost { host: host.to_owned(), presented: "other names".into() }
                }
                CertificateError::NotValidForNameContext { presented, .. } => TlsError::WrongHost {
                    host: host.to_owned(),
                    presented: if presented.is_empty() {
                        "no names".into()
                    } else {
                        presented.iter().map(|name| tidy_name(name)).collect::<Vec<_>>().join(", ")
                    },
                },
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsError::Validity(tls.to_string()),
                _ => TlsError::BadCertificate(tls.to_string()),
            },
            other => TlsError::Handshake(other.to_string()),
        }
    }
}

/// A subject name as rustls reports it (`DnsName("db.example.com")`,
/// `IpAddress(10.0.0.1)`) without the wrapping.
fn tidy_name(name: &str) -> &str {
    name.strip_suffix(')').and_then(|n| n.split_once('(')).map_or(name, |(_, inner)| inner.trim_matches('"'))
}

/// The crypto provider: ring.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted CAs of `sslrootcert`.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::RootCertUnreadable { path: path.to_owned(), source })?;
    let invalid = |reason: String| TlsError::RootCertInvalid { path: path.to_owned(), reason };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(e.to_string()))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no -----BEGIN CERTIFICATE----- section".into()));
    }
    Ok(roots)
}

/// The rustls client configuration for `settings` (reads `sslrootcert`).
///
/// # Errors
/// When the root certificate file cannot be read or holds no certificate.
pub fn client_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let roots = match &settings.root_cert {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None => None,
    };
    let verifier = PgVerifier {
        roots,
        check_name: settings.mode == SslMode::VerifyFull,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Handshake(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS server name for a host (DNS name or IP address).
fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadServerName(host.to_owned()))
}

/// Runs the TLS handshake over `stream` (after the server accepted the
/// SSLRequest), verifying as `settings` say.
///
/// # Errors
/// Certificate problems and handshake failures as [`TlsError`]s naming the fix.
pub async fn handshake<S>(
    stream: S,
    config: Arc<ClientConfig>,
    host: &str,
    settings: &TlsSettings,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = server_name(host)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|err| TlsError::classify(err, settings, host))
}

/// The server certificate check for every mode (see the module doc).
#[derive(Debug)]
struct PgVerifier {
    /// `sslrootcert`'s CAs; `None`: any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    /// `verify-full`: the certificate must name the host.
    check_name: bool,
    /// Signature algorithms for chains and handshake signatures.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A hash function for `tls-server-end-point`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// One DER element: (tag, contents, what follows). `None` when truncated or
/// the length is not a definite one of at most 4 bytes.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The hash for `tls-server-end-point` of a DER certificate: that of its
/// signature algorithm (`Certificate.signatureAlgorithm`), SHA-256 for MD5
/// and SHA-1; `None` for algorithms without one (Ed25519, RSA-PSS) or an
/// unreadable certificate.
fn signature_hash(cert: &[u8]) -> Option<EndPointHash> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    /// 1.2.840.113549.1.1 (PKCS #1).
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    /// 1.2.840.10045.4 (ECDSA signatures).
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let (SEQUENCE, certificate, _) = der_element(cert)? else { return None };
    let (SEQUENCE, _tbs, rest) = der_element(certificate)? else { return None };
    let (SEQUENCE, algorithm, _) = der_element(rest)? else { return None };
    let (OID, oid, _) = der_element(algorithm)? else { return None };
    if let Some(arc) = oid.strip_prefix(PKCS1) {
        return match arc {
            // md5, sha1, sha256 WithRSAEncryption
            [0x04] | [0x05] | [0x0b] => Some(EndPointHash::Sha256),
            [0x0c] => Some(EndPointHash::Sha384),
            [0x0d] => Some(EndPointHash::Sha512),
            [0x0e] => Some(EndPointHash::Sha224),
            _ => None,
        };
    }
    if let Some(arc) = oid.strip_prefix(ECDSA) {
        return match arc {
            // ecdsa-with-SHA1, ecdsa-with-SHA256
            [0x01] | [0x03, 0x02] => Some(EndPointHash::Sha256),
            [0x03, 0x01] => Some(EndPointHash::Sha224),
            [0x03, 0x03] => Some(EndPointHash::Sha384),
            [0x03, 0x04] => Some(EndPointHash::Sha512),
            _ => None,
        };
    }
    None
}

/// `tls-server-end-point` channel-binding data for a server certificate.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(cert)? {
        EndPointHash::Sha224 => sha2::Sha224::digest(cert).to_vec(),
        EndPointHash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        EndPointHash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        EndPointHash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// Channel-binding data of an established TLS session.
pub(crate) fn session_end_point<S>(stream: &tokio_rustls::client::TlsStream<S>) -> Option<Vec<u8>> {
    let certs = stream.get_ref().1.peer_certificates()?;
    tls_server_end_point(certs.first()?)
}

/// tokio-postgres' connector: one [`RustlsConnect`] per host tried; the
/// rustls configuration is built on first use (so `sslmode=disable` never
/// reads `sslrootcert`).
#[derive(Debug, Clone)]
pub struct MakeRustls {
    settings: TlsSettings,
    config: Option<Arc<ClientConfig>>,
}

impl MakeRustls {
    /// A connector for `settings`.
    pub fn new(settings: TlsSettings) -> MakeRustls {
        MakeRustls { settings, config: None }
    }
}

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for MakeRustls {
    type Stream = RustlsStream<tokio_postgres::Socket>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, TlsError> {
        if self.settings.mode == SslMode::Disable {
            return Ok(RustlsConnect { config: None, host: host.to_owned(), settings: self.settings.clone() });
        }
        let config = match &self.config {
            Some(config) => Arc::clone(config),
            None => {
                let config = client_config(&self.settings)?;
                self.config = Some(Arc::clone(&config));
                config
            }
        };
        Ok(RustlsConnect { config: Some(config), host: host.to_owned(), settings: self.settings.clone() })
    }
}

/// The handshake for one host (see [`MakeRustls`]).
#[derive(Debug)]
pub struct RustlsConnect {
    /// `None` for `sslmode=disable`: tokio-postgres never asks for TLS then.
    config: Option<Arc<ClientConfig>>,
    host: String,
    settings: TlsSettings,
}

impl tokio_postgres::tls::TlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = RustlsStream<tokio_postgres::Socket>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, TlsError>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let Some(config) = self.config else {
                return Err(TlsError::Handshake("TLS was asked for with sslmode=disable".into()));
            };
            let stream = handshake(stream, config, &self.host, &self.settings).await?;
            let end_point = session_end_point(&stream);
            Ok(RustlsStream { inner: Box::new(stream), end_point })
        })
    }
}

/// A TLS stream for tokio-postgres, with its channel-binding data.
#[derive(Debug)]
pub struct RustlsStream<S> {
    inner: Box<tokio_rustls::client::TlsStream<S>>,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_hash(&p256), Some(EndPointHash::Sha256));
        assert_eq!(tls_server_end_point(&p256), Some(sha2::Sha256::digest(&p256).to_vec()));
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_hash(&p384), Some(EndPointHash::Sha384));
        assert_eq!(tls_server_end_point(&p384).map(|h| h.len()), Some(48));
        let ed = cert_with(&rcgen::PKCS_ED25519);
        assert_eq!(signature_hash(&ed), None, "Ed25519 has no hash: no binding");
    }

    #[test]
    fn presented_names_are_tidied() {
        assert_eq!(tidy_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(tidy_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(tidy_name("plain"), "plain");
    }

    #[test]
    fn der_walk_rejects_truncated_and_odd_input() {
        let cert = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        for len in [0, 1, 2, 5, cert.len() / 2, cert.len() - 1] {
            // A truncated outer SEQUENCE is refused, never a panic.
            assert_eq!(signature_hash(&cert[..len]), None, "len {len}");
        }
        assert_eq!(der_element(&[0x30, 0x85, 0, 0, 0, 0, 1]), None, "5-byte length");
        assert_eq!(der_element(&[0x30, 0x80]), None, "indefinite length");
        assert_eq!(der_element(&[0x30, 0x82, 0xff]), None);
        assert_eq!(der_element(&[0x04, 0x01, 0xaa, 0xbb]), Some((0x04, &[0xaa][..], &[0xbb][..])));
        assert_eq!(signature_hash(b"not a certificate"), None);
    }

    #[test]
    fn root_cert_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err =
            client_config(&TlsSettings { mode: SslMode::VerifyCa, root_cert: Some(missing.clone()) }).unwrap_err();
        assert!(matches!(err, TlsError::RootCertUnreadable { .. }), "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = client_config(&TlsSettings { mode: SslMode::VerifyFull, root_cert: Some(empty) }).unwrap_err();
        assert!(matches!(err, TlsError::RootCertInvalid { .. }), "{err}");
        assert!(!err.is_transient());
    }
}
