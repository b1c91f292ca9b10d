//! The head's accept loop on the cluster port, in front of ractor_cluster's node server (whose own
//! listener handshakes one TLS client at a time, with no deadline and no cap). Each connection
//! takes a slot of `cluster.max_connections` (none free: closed at once) until its session ends;
//! TLS (mutual, when configured) runs in the connection's own task; a connection that has not
//! passed TLS and the cookie check within `cluster.handshake_timeout_secs` is cut. Accepted
//! streams go to the node server as external streams labelled `peer#n`; sessions that did not
//! come through here (the node server's own loopback listener) are stopped by the head.

use std::collections::HashMap;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits of the accept loop.
#[derive(Clone)]
pub struct GateConfig {
    /// Open connections at most (authenticated or not).
    pub max_connections: usize,
    /// Time from accept to an authenticated session (TLS handshake and cookie check).
    pub handshake_timeout: Duration,
    /// Mutual TLS; `None`: plain TCP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A connection handed to the node server, until its session closes.
struct Conn {
    authenticated: bool,
    /// The client's certificate (mutual TLS), which the node name it claims must bear.
    cert: Option<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    /// A duplicate of the socket, to cut it if it does not authenticate in time.
    cut: Option<std::net::TcpStream>,
}

/// Connections that came through the gate, by label.
#[derive(Clone, Default)]
pub struct Conns {
    inner: Arc<Mutex<HashMap<String, Conn>>>,
}

impl Conns {
    /// Whether the session labelled `label` came through the gate.
    pub fn is_ours(&self, label: &str) -> bool {
        self.inner.lock().expect("conns").contains_key(label)
    }

    /// Whether the node named `node` may speak on `label`: any name without TLS; with it, a name
    /// whose host part its certificate is valid for.
    pub fn name_bound(&self, label: &str, node: &str) -> Result<(), String> {
        let inner = self.inner.lock().expect("conns");
        match inner.get(label).and_then(|c| c.cert.as_ref()) {
            None => Ok(()),
            Some(cert) => super::tls::valid_for(cert, super::tls::node_host(node)),
        }
    }

    pub fn authenticated(&self, label: &str) {
        if let Some(c) = self.inner.lock().expect("conns").get_mut(label) {
            c.authenticated = true;
            c.cut = None;
        }
    }

    pub fn closed(&self, label: &str) {
        self.inner.lock().expect("conns").remove(label);
    }

    /// Cuts `label` unless it authenticated; true if it was cut.
    fn cut_unless_authenticated(&self, label: &str) -> bool {
        let mut inner = self.inner.lock().expect("conns");
        match inner.get(label) {
            Some(c) if !c.authenticated => {
                if let Some(sock) = inner.remove(label).and_then(|c| c.cut) {
                    let _ = sock.shutdown(Shutdown::Both);
                }
                true
            }
            _ => false,
        }
    }
}

/// A stream that holds its connection slot until the node server drops its read half.
struct Held<S> {
    stream: S,
    permit: OwnedSemaphorePermit,
    label: String,
}

struct HeldRead<R> {
    inner: R,
    _permit: OwnedSemaphorePermit,
}

impl<R: AsyncRead + Unpin> AsyncRead for HeldRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S> ClusterBidiStream for Held<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.stream);
        (
            Box::new(HeldRead {
                inner: r,
                _permit: self.permit,
            }),
            Box::new(w),
        )
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

/// Accepts on `listener` forever, handing connections to `server`.
pub fn spawn(
    listener: TcpListener,
    server: ActorRef<NodeServerMessage>,
    config: GateConfig,
    conns: Conns,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut n: u64 = 0;
        let mut last_full_warning: Option<Instant> = None;
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cluster: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    last_full_warning = Some(Instant::now());
                    tracing::warn!(%peer, max = config.max_connections, "cluster: connection refused, cluster.max_connections reached");
                }
                drop(sock);
                continue;
            };
            n += 1;
            let label = format!("{peer}#{n}");
            tokio::spawn(handshake(
                sock,
                label,
                permit,
                server.clone(),
                config.clone(),
                conns.clone(),
            ));
        }
    })
}

async fn handshake(
    sock: TcpStream,
    label: String,
    permit: OwnedSemaphorePermit,
    server: ActorRef<NodeServerMessage>,
    config: GateConfig,
    conns: Conns,
) {
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let _ = sock.set_nodelay(true);
    let split = sock.into_std().and_then(|s| {
        let cut = s.try_clone()?;
        Ok((TcpStream::from_std(s)?, cut))
    });
    let (sock, cut) = match split {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%label, error = %e, "cluster: cannot set up the connection");
            return;
        }
    };
    conns.inner.lock().expect("conns").insert(
        label.clone(),
        Conn {
            authenticated: false,
            cert: None,
            cut: Some(cut),
        },
    );
    let stream: Box<dyn ClusterBidiStream> = match &config.tls {
        None => Box::new(Held {
            stream: sock,
            permit,
            label: label.clone(),
        }),
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(sock)).await {
            Ok(Ok(stream)) => {
                let cert = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|c| c.clone().into_owned());
                if let Some(c) = conns.inner.lock().expect("conns").get_mut(&label) {
                    c.cert = cert;
                }
                Box::new(Held {
                    stream,
                    permit,
                    label: label.clone(),
                })
            }
            Ok(Err(e)) => {
                conns.closed(&label);
                tracing::warn!(%label, error = %e, "cluster: TLS handshake failed (a node without a certificate signed by cluster.tls_ca, or not speaking TLS)");
                return;
            }
            Err(_) => {
                conns.closed(&label);
                tracing::warn!(%label, "cluster: TLS handshake timed out (cluster.handshake_timeout_secs); connection closed");
                return;
            }
        },
    };
    if server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream,
            is_server: true,
        })
        .is_err()
    {
        conns.closed(&label);
        return;
    }
    tokio::time::sleep_until(deadline).await;
    if conns.cut_unless_authenticated(&label) {
        tracing::warn!(%label, "cluster: connection did not authenticate within cluster.handshake_timeout_secs; closed");
    }
}
