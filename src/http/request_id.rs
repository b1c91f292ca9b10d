//! `X-Request-Id`: taken from the request when it is a plain token (1 to 128 of `A-Z a-z 0-9 . _
//! : -`), made up otherwise (`req-<uuid>`), and returned on every response. The handler runs in a
//! `request` span carrying it, so every log line of the request has `request_id`, ending with an
//! access line (status, latency; at debug for `/health`, `/ready` and `/metrics`); a generation
//! carries it to the replica that serves it, on whichever node (`ChatWork::trace_id`), whose lines
//! carry it too. It only labels logs: the ids that route streams stay the server's own, so a
//! client reusing an id cannot touch another request.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, for handlers (`Extension<RequestId>`).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Whether a client's id is kept as it is.
pub fn acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable(id))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{}", uuid::Uuid::new_v4().simple()));
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path()
    );
    let quiet = matches!(request.uri().path(), "/health" | "/ready" | "/metrics");
    let started = std::time::Instant::now();
    let mut response = async {
        let response = next.run(request).await;
        let (status, latency_ms) = (
            response.status().as_u16(),
            started.elapsed().as_secs_f64() * 1e3,
        );
        // An access line per request (probes and scrapes only at debug).
        if quiet {
            tracing::debug!(status, latency_ms, "request");
        } else {
            tracing::info!(status, latency_ms, "request");
        }
        response
    }
    .instrument(span)
    .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_kept() {
        assert!(acceptable("trace-1.2_3:x"));
        assert!(acceptable(&"a".repeat(128)));
        for bad in ["", "a b", "a\nb", "é", "<script>", &"a".repeat(129)] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }
}
