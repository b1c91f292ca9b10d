//! One error type for every route: a status, a stable `type`, a message and the request field at
//! fault, rendered as `{"error": {"type", "message", "field"}}` (and as an SSE `error` event
//! mid-stream). `ApiJson` and `ApiQuery` are the extractors whose rejections use this same format,
//! and [`json_errors`] rewrites any other error response (a path rejection, 405) into it.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tessera_actors::jobs::JobError;
use tessera_actors::messages::{ServeError, ServeErrorKind};

#[derive(Debug, Clone)]
pub struct AppError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub field: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable kind: `invalid_request`, `forbidden`, `not_found`, `conflict`,
    /// `unauthorized`, `overloaded`, `unavailable`, `timeout`, `payload_too_large`, `internal`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl AppError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            field: None,
        }
    }

    /// 422: a value out of range or of the wrong shape, naming the field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            kind: "invalid_request",
            message: format!("{field}: {message}"),
            field: Some(field),
        }
    }

    /// 400: a request that cannot be served as asked (a missing file, an unknown model).
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    pub fn forbidden(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "forbidden",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request took longer than {secs} s (server.request_timeout_secs)"),
        )
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                kind: self.kind.to_string(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<ServeError> for AppError {
    fn from(e: ServeError) -> Self {
        let (status, kind) = match e.kind {
            ServeErrorKind::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ServeErrorKind::Adapter | ServeErrorKind::Grammar => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ServeErrorKind::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ServeErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ServeErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let message = match &e.field {
            Some(f) if !e.message.starts_with(f.as_str()) => format!("{f}: {}", e.message),
            _ => e.message,
        };
        Self {
            status,
            kind,
            message,
            field: e.field,
        }
    }
}

impl From<JobError> for AppError {
    fn from(e: JobError) -> Self {
        match &e {
            JobError::NotFound(_) => Self::not_found(e.to_string()),
            JobError::Final { .. } => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            JobError::OutputConflict { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string()).with_field("output_path")
            }
            JobError::Unavailable | JobError::Busy(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            JobError::QueueFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", e.to_string())
            }
            JobError::Store(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<tessera_actors::deployments::DeploymentError> for AppError {
    fn from(e: tessera_actors::deployments::DeploymentError) -> Self {
        use tessera_actors::deployments::DeploymentError as E;
        match &e {
            E::NotFound(_) => Self::not_found(e.to_string()),
            E::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            E::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            E::Store(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

/// `axum::Json`, with rejections (bad JSON, wrong types, unknown fields, too large) in our format.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `axum::extract::Query`, with rejections in our format naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => {
                let text = rejection.body_text();
                let field = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .and_then(|rest| rest.split_once(": "))
                    .map(|(field, _)| field.to_string())
                    .filter(|f| !f.contains(' '));
                Err(AppError {
                    status: StatusCode::BAD_REQUEST,
                    kind: "invalid_request",
                    message: text,
                    field,
                })
            }
        }
    }
}

/// The stable `type` of an error status.
fn kind_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 | 504 => "timeout",
        409 => "conflict",
        413 => "payload_too_large",
        429 => "overloaded",
        503 => "unavailable",
        400..=499 => "invalid_request",
        _ => "internal",
    }
}

/// Middleware: an error response that is not already our JSON error (an extractor's plain-text
/// rejection, a bare 405) is rewritten into `{"error": {"type", "message"}}`, headers kept.
pub async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    let fresh = AppError::new(status, kind_of(status), message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let (fresh_parts, fresh_body) = fresh.into_parts();
    parts.headers.extend(fresh_parts.headers);
    Response::from_parts(parts, fresh_body)
}

fn json_rejection(rejection: JsonRejection) -> AppError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return AppError::new(
            status,
            "payload_too_large",
            "the request body is larger than server.max_body_bytes",
        );
    }
    let text = rejection.body_text();
    // serde names the field in messages like "unknown field `x`" or "foo: invalid type".
    let field = field_of(&text);
    AppError {
        status: if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            status
        } else {
            StatusCode::BAD_REQUEST
        },
        kind: "invalid_request",
        message: text,
        field,
    }
}

/// The field a serde message names: `unknown field `x``, `missing field `x``, or a `path: ...`
/// prefix from `serde_path_to_error`-style messages.
fn field_of(text: &str) -> Option<String> {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(rest) = text.split(marker).nth(1) {
            return rest.split('`').next().map(str::to_string);
        }
    }
    let body = text.strip_prefix("Failed to deserialize the JSON body into the target type: ")?;
    let (path, _) = body.split_once(": ")?;
    (!path.contains(' ')).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_serde_messages() {
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: unknown field `lora_rank`, expected one of").as_deref(),
            Some("lora_rank")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: max_tokens: invalid type: string \"x\", expected usize at line 1 column 20").as_deref(),
            Some("max_tokens")
        );
    }
}
