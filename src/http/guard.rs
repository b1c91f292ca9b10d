//! Who may send a request, decided from its head alone, before any body is read (a stranger
//! cannot make the server buffer bodies it will refuse):
//!
//! * **Bearer token** (`server.auth_token`): every route but the public ones ([`PUBLIC`]) needs
//!   `Authorization: Bearer <token>`, compared in time independent of the guess.
//! * **Host names without a token** (DNS rebinding): a web page the operator opens can point its
//!   own domain at 127.0.0.1 and send requests that a token-less head on loopback would obey. Its
//!   requests carry that domain as `Host`, so without a token only IP literals, `localhost`
//!   (and `*.localhost`) and the names in `server.allowed_hosts` are served (`"*"` there: any).

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::AppError;
use super::AppState;

/// Routes served without the token: probes and the dashboard's page (which holds no data).
pub const PUBLIC: &[&str] = &["/health", "/ready", "/", "/dashboard"];

/// The middleware: the Host check (no token configured) or the token check.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match &state.auth_token {
        None => {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| request.uri().host());
            if let Some(host) = host {
                if !host_allowed(host, &state.allowed_hosts) {
                    return AppError::new(
                        StatusCode::FORBIDDEN,
                        "host_not_allowed",
                        format!(
                            "Host {host:?} is not served without server.auth_token (a guard \
                             against DNS rebinding): use an IP address or localhost, add the \
                             name to server.allowed_hosts, or set a token"
                        ),
                    )
                    .into_response();
                }
            }
        }
        Some(token)
            if !PUBLIC.contains(&request.uri().path())
                && !bearer_matches(request.headers(), token) =>
        {
            let mut response = AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <server.auth_token>)",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        Some(_) => {}
    }
    next.run(request).await
}

/// Whether `headers` carry `Authorization: Bearer <token>`.
pub fn bearer_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes()))
}

/// `given == secret`, in a time that depends on the secret's length only (not on where a guess
/// first differs, nor on the guess's length).
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut differ = u8::from(given.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        differ |= given.get(i).copied().unwrap_or(!s) ^ s;
    }
    differ == 0
}

/// Whether a token-less head serves a request whose `Host` is `host` (`name[:port]`).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]:port`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('.').eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_without_a_token() {
        let allowed = vec!["tessera.internal".to_string()];
        for host in [
            "127.0.0.1:8000",
            "localhost:8000",
            "LOCALHOST",
            "[::1]:8000",
            "10.1.2.3",
            "app.localhost:80",
            "tessera.internal:8000",
            "Tessera.Internal.",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8000",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
        assert!(host_allowed("anything.example", &["*".to_string()]));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        for guess in [&b"abd"[..], b"ab", b"abcd", b"", b"xbc"] {
            assert!(!same_secret(guess, b"abc"), "{guess:?}");
        }
    }
}
