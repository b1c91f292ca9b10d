//! `GET /` and `GET /dashboard`: the dashboard, one HTML page with its CSS and JavaScript inline
//! (no CDN, works offline), compiled into the binary. It reads the API with the bearer token the
//! user types (kept in the tab's `sessionStorage` only): the cluster (nodes, tags, devices,
//! replicas with their adapters and load), fine-tune jobs (state, progress, errors, a live loss
//! curve from `/jobs/{id}/events`, cancel) and a streaming chat playground over
//! `/v1/chat/completions`. Every string from the server is set as text, never as HTML, and the
//! page's Content-Security-Policy allows nothing but itself.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("dashboard/index.html");

const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
}
