//! The one error shape of the HTTP API: `{"error": "<stable_code>", "message": "<sentence>"}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::engine::EngineError;

/// An error answered to an HTTP client. Internals (SQL, broker) are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    header: Option<(HeaderName, HeaderValue)>,
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code to act on, such as `not_found`, `invalid_input` or `unauthorized`.
    pub error: String,
    /// A sentence for people; it never contains internals (SQL, broker errors).
    pub message: String,
}

impl ApiError {
    /// An error with a status, a stable code and a human sentence.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            header: None,
        }
    }

    /// The same error with a header on the answer (such as `WWW-Authenticate`).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.header = Some((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The sentence for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// 400 for a body that parses but does not say what it must.
    pub fn invalid_body(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }

    /// 400 for a query parameter that does not fit; the message names the parameter.
    pub fn invalid_query(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
    }

    /// 413 for a body over the configured limit.
    pub fn body_too_large() -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server accepts (SAGAS_BODY_LIMIT)",
        )
    }

    /// 404 for a path that names nothing.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some((name, value)) = self.header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON with Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::body_too_large()
            }
            JsonRejection::BytesRejection(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                "the request body could not be read",
            ),
            other => ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_path", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid_query(r.body_text())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownDefinition(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_definition", e.to_string())
            }
            EngineError::InvalidInput(..) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string())
            }
            EngineError::NotFound(_) => ApiError::not_found(e.to_string()),
            EngineError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            EngineError::MissingDefinition(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "definition_unavailable",
                e.to_string(),
            ),
            EngineError::Definition(crate::definition::DefinitionError::Invalid(_)) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_definition", e.to_string())
            }
            EngineError::Definition(_) => {
                ApiError::new(StatusCode::CONFLICT, "definition_conflict", e.to_string())
            }
            EngineError::Store(inner) => {
                tracing::error!(error = %inner, "store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "internal database error; retry later",
                )
            }
            EngineError::Transport(inner) => {
                tracing::error!(error = %inner, "transport error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "internal broker error; retry later",
                )
            }
        }
    }
}
