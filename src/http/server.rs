//! The HTTP server loop: `axum::serve`'s, plus a deadline on request headers. A client must send a
//! request's whole head within `server.header_read_timeout_secs` of the server starting to wait
//! for it (for a kept-alive connection, from the end of the previous response), or its connection
//! is closed: a client trickling header bytes (slowloris) or holding an idle connection cannot keep
//! one of the `server.max_connections` slots for long. Bodies have their own deadline
//! (`server.body_read_timeout_secs`, see `read_body`); responses, streams included, have none.
//! Graceful shutdown as in axum: stop accepting, let each connection finish its requests. HTTP/1.1
//! only, as `axum::serve` without its `http2` feature.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

/// Serves `app` on `listener` until `shutdown` resolves, then until every connection has
/// finished its requests.
pub async fn serve<L, S>(
    mut listener: L,
    app: S,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (io, _addr) = tokio::select! {
            conn = listener.accept() => conn,
            _ = signal_tx.closed() => break,
        };
        let service = app
            .clone()
            .map_request(|req: Request<Incoming>| req.map(Body::new));
        let service = TowerToHyperService::new(service);
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let mut signal_closed = std::pin::pin!(signal_tx.closed());
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut signal_closed, if !shutting_down => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}
