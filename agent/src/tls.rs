//! Mutual TLS with pinned peer certificates.
//!
//! Every node has its own key and self-signed certificate (`tandem keygen`). The config
//! names, for each node, the certificate it must present; a peer is accepted only if its
//! certificate is byte-for-byte the one configured for a node (compared by SHA-256
//! fingerprint), like SSH host keys. The TLS 1.3 handshake signature is still verified
//! against that certificate, so holding the certificate without the key gets nowhere.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tracing::warn;

/// A node's own certificate chain and private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow!("cannot read private key {}: {e}", key.display()))?;
        Ok(Self { chain, key })
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("cannot read certificate {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("certificate {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("certificate {} contains no certificate", path.display()));
    }
    Ok(certs)
}

/// "sha256:" + hex of the DER certificate's SHA-256.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = Sha256::digest(cert.as_ref());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Certificates we accept, by fingerprint, mapped to the node they identify.
#[derive(Debug, Clone, Default)]
pub struct PinnedPeers {
    by_fingerprint: HashMap<String, String>,
}

impl PinnedPeers {
    pub fn insert(&mut self, node: &str, cert: &CertificateDer<'_>) {
        self.by_fingerprint.insert(fingerprint(cert), node.to_string());
    }

    pub fn node_of(&self, cert: &CertificateDer<'_>) -> Option<&str> {
        self.by_fingerprint.get(&fingerprint(cert)).map(|s| s.as_str())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn refuse(cert: &CertificateDer<'_>, side: &str, expected: &str) -> rustls::Error {
    let fp = fingerprint(cert);
    warn!("refused {side} certificate {fp}: it is not {expected}");
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

/// Client side: the server must present exactly the certificate configured for `node`.
#[derive(Debug)]
struct ExpectServer {
    node: String,
    pinned: PinnedPeers,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pinned.node_of(end_entity) {
            Some(n) if n == self.node => Ok(ServerCertVerified::assertion()),
            _ => Err(refuse(
                end_entity,
                "server",
                &format!("the certificate configured for node {}", self.node),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: the client must present the certificate of one of our peer nodes.
#[derive(Debug)]
struct ExpectAnyPeer {
    pinned: PinnedPeers,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ExpectAnyPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.pinned.node_of(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(refuse(end_entity, "client", "the certificate configured for any peer node")),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS for accepting connections from any configured peer.
pub fn server_config(id: &Identity, pinned: &PinnedPeers) -> Result<rustls::ServerConfig> {
    let p = provider();
    let verifier =
        Arc::new(ExpectAnyPeer { pinned: pinned.clone(), algs: p.signature_verification_algorithms });
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 setup")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("own certificate and key do not form a usable identity")?;
    cfg.alpn_protocols = vec![tandem_protocol::ALPN.to_vec()];
    Ok(cfg)
}

/// TLS for connecting to `node`, which must present its configured certificate.
pub fn client_config(id: &Identity, pinned: &PinnedPeers, node: &str) -> Result<rustls::ClientConfig> {
    let p = provider();
    let verifier = Arc::new(ExpectServer {
        node: node.to_string(),
        pinned: pinned.clone(),
        algs: p.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 setup")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("own certificate and key do not form a usable identity")?;
    cfg.alpn_protocols = vec![tandem_protocol::ALPN.to_vec()];
    Ok(cfg)
}

/// Writes a new key and self-signed certificate for `name` into `dir`.
pub fn keygen(name: &str, dir: &Path, force: bool) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    if !force {
        for p in [&crt, &key] {
            if p.exists() {
                return Err(anyhow!("{} already exists (use --force to replace it)", p.display()));
            }
        }
    }
    let kp = rcgen::KeyPair::generate().context("generating key")?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).context("certificate parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("tandem node {name}"));
    let cert = params.self_signed(&kp).context("signing certificate")?;
    let write = |path: &Path, data: &str, mode: u32| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    write(&key, &kp.serialize_pem(), 0o600)?;
    write(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key))
}
