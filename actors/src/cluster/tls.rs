//! Mutual TLS for the cluster socket: loads `cluster.tls_cert` / `tls_key` / `tls_ca` (PEM) into a
//! rustls server config that requires a client certificate signed by the CA (the head) and a
//! client config that presents this node's certificate and trusts only the CA (a worker); and the
//! worker's dial (TCP connect, then TLS, each under a timeout) that hands the stream to the node
//! server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use ractor_cluster::{NetworkStream, NodeServerMessage};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The PEM files of one node: its certificate chain, its private key, and the CA that signs every
/// node of the cluster.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{key}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: no certificate in {} (PEM expected)",
            path.display()
        ));
    }
    Ok(certs)
}

impl TlsFiles {
    fn load(
        &self,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            Arc<rustls::RootCertStore>,
        ),
        String,
    > {
        let chain = certs(&self.cert, "cluster.tls_cert")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            format!(
                "cluster.tls_key: cannot read a private key from {}: {e}",
                self.key.display()
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&self.ca, "cluster.tls_ca")? {
            roots
                .add(ca)
                .map_err(|e| format!("cluster.tls_ca: {}: {e}", self.ca.display()))?;
        }
        Ok((chain, key, Arc::new(roots)))
    }

    /// The head's side: its certificate, and only clients with a certificate from the CA.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        let (chain, key, roots) = self.load()?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| format!("cluster.tls_ca: {e}"))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cluster TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("cluster.tls_cert / cluster.tls_key: {e}"))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// A worker's side: trusts only the CA, presents its own certificate.
    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector, String> {
        let (chain, key, roots) = self.load()?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cluster TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("cluster.tls_cert / cluster.tls_key: {e}"))?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// The host part of a worker's node name (`HOST-PID-SUFFIX`, see `tessera worker`).
pub fn node_host(node: &str) -> &str {
    let mut parts = node.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(host)) => host,
        _ => node,
    }
}

/// Whether `cert` (a node's end-entity certificate) is valid for `host` (a DNS name or an IP in
/// its subject alternative names): the name a node may claim is bound to its certificate.
pub fn valid_for(cert: &CertificateDer<'_>, host: &str) -> Result<(), String> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("`{host}` is not a host name or address: {e}"))?;
    let cert = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the certificate is not valid for `{host}`"))
}

impl TlsFiles {
    /// A worker's check of its own certificate before it joins: valid for `host`, the host part
    /// of its node name (the head refuses a session whose name its certificate does not bear).
    pub fn check_name(&self, host: &str) -> Result<(), String> {
        let chain = certs(&self.cert, "cluster.tls_cert")?;
        valid_for(&chain[0], host).map_err(|e| {
            format!(
                "cluster.tls_cert ({}): {e}; a worker's name is its cluster.node_name (else its host name), which must be a DNS name or address of its certificate",
                self.cert.display()
            )
        })
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Worth retrying: the head is not (yet) there, or slow.
    #[error("{0}")]
    Unreachable(String),
    /// A configuration error: the TLS handshake was refused.
    #[error("{0}")]
    Tls(String),
}

/// Dials `addr` (`HOST:PORT`) and hands the connection to `server` as an outgoing session; with a
/// connector, the head's certificate must be valid for `HOST` and signed by the CA.
pub async fn dial(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    timeout: Duration,
) -> Result<(), DialError> {
    use DialError::{Tls, Unreachable};
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Unreachable(format!("connecting to {addr} timed out")))?
        .map_err(|e| Unreachable(format!("connecting to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let peer_addr = stream.peer_addr().map_err(|e| Unreachable(e.to_string()))?;
    let local_addr = stream
        .local_addr()
        .map_err(|e| Unreachable(e.to_string()))?;
    let stream = match tls {
        None => NetworkStream::Raw {
            peer_addr,
            local_addr,
            stream,
        },
        Some(connector) => {
            let host = addr
                .rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| Tls(format!("--join {addr}: `{host}` is not a host name: {e}")))?;
            let stream = tokio::time::timeout(timeout, connector.connect(name, stream))
                .await
                .map_err(|_| Unreachable(format!("TLS handshake with {addr} timed out")))?
                .map_err(|e| Tls(format!("TLS handshake with {addr}: {e}")))?;
            NetworkStream::TlsClient {
                peer_addr,
                local_addr,
                stream,
            }
        }
    };
    server
        .cast(NodeServerMessage::ConnectionOpened {
            stream: Box::new(stream),
            is_server: false,
        })
        .map_err(|e| Unreachable(format!("cluster node server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::node_host;

    #[test]
    fn the_host_part_of_a_node_name_is_what_its_certificate_must_bear() {
        assert_eq!(node_host("localhost-4242-a1b2c3"), "localhost");
        assert_eq!(
            node_host("gpu-node-3.example-17-ffffff"),
            "gpu-node-3.example"
        );
        assert_eq!(node_host("plain"), "plain");
    }
}
