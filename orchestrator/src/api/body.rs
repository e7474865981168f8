//! Request bodies: a declared length over the limit refused before reading, JSON read within a
//! deadline, and text that cannot be stored refused as the client's error.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;
use crate::config::DEFAULT_HTTP_BODY_TIMEOUT;

/// How much of a request body is read, and for how long (a request extension set by
/// [`limit_body`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest accepted body in bytes.
    pub limit: usize,
    /// Time to send the whole body once a handler reads it.
    pub timeout: Duration,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            limit: super::BODY_LIMIT,
            timeout: DEFAULT_HTTP_BODY_TIMEOUT,
        }
    }
}

/// The answer to a request whose body was not read: the connection cannot carry another
/// request, so it is closed.
fn closing(error: ApiError) -> ApiError {
    error.with_header(CONNECTION, HeaderValue::from_static("close"))
}

/// Middleware: a request that declares a body over the limit is answered 413 at once, before
/// any of it is read; others go on with the [`BodyLimits`] for [`JsonBody`] to read by.
pub async fn limit_body(
    State(limits): State<BodyLimits>,
    mut request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.limit as u64) {
        return closing(ApiError::body_too_large()).into_response();
    }
    request.extensions_mut().insert(limits);
    next.run(request).await
}

/// Whether the request says its body is JSON (`application/json`, or `application/*+json`).
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// The whole body, at most `limits.limit` bytes, within `limits.timeout`.
async fn read(body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let collect = Limited::new(body, limits.limit).collect();
    match tokio::time::timeout(limits.timeout, collect).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(closing(ApiError::body_too_large()))
        }
        // The client went away or sent a body that does not parse as HTTP.
        Ok(Err(_)) => Err(closing(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "the request body could not be read",
        ))),
        Err(_) => Err(closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms (SAGAS_HTTP_BODY_TIMEOUT_MS)",
                limits.timeout.as_millis()
            ),
        ))),
    }
}

/// Where `value` holds a NUL character (`\u0000`), in a string or a key: a path such as
/// `input.to` or `input.legs[2]`, or `None`. PostgreSQL text and jsonb cannot store it.
pub fn nul_at(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(key, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key.replace('\0', "\\u0000"));
                let found = key.contains('\0') || walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    let mut path = String::new();
    walk(value, &mut path).then(|| {
        if path.is_empty() {
            "the body".to_owned()
        } else {
            path
        }
    })
}

/// A JSON request body: `Content-Type: application/json` (else 415), read within the body
/// timeout (else 408) and the body limit (else 413), JSON (else 400 `malformed_body`), free of
/// NUL characters anywhere in its text (else 400 `invalid_body` naming where), and of type `T`
/// (else 400 `malformed_body`).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        if !json_content_type(request.headers()) {
            // The body is left unread: the connection closes after this answer.
            return Err(closing(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON with Content-Type: application/json",
            )));
        }
        let limits = request
            .extensions()
            .get::<BodyLimits>()
            .copied()
            .unwrap_or_default();
        let bytes = read(request.into_body(), limits).await?;
        let Json(value) = Json::<Value>::from_bytes(&bytes)?;
        if let Some(at) = nul_at(&value) {
            return Err(ApiError::invalid_body(format!(
                "text in the body cannot contain the NUL character (\\u0000), which cannot be \
                 stored; found at {at}"
            )));
        }
        let Json(typed) = Json::<T>::from_bytes(&bytes)?;
        Ok(JsonBody(typed))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_characters_are_found_in_nested_values_and_keys_with_their_path() {
        assert_eq!(
            nul_at(&json!({"input": {"from": "a", "n": [1, null, true]}})),
            None
        );
        assert_eq!(
            nul_at(&json!({"input": {"from": "acct-1\u{0}", "to": "b"}})).as_deref(),
            Some("input.from")
        );
        assert_eq!(
            nul_at(&json!({"input": {"legs": [{"a": "x"}, "y", ["\u{0}"]]}})).as_deref(),
            Some("input.legs[2][0]")
        );
        assert_eq!(
            nul_at(&json!({"input": {"k\u{0}ey": 1}})).as_deref(),
            Some("input.k\\u0000ey")
        );
        assert_eq!(nul_at(&json!("\u{0}")).as_deref(), Some("the body"));
    }

    #[test]
    fn json_content_types_are_recognized_with_parameters_and_suffixes() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            json_content_type(&h)
        };
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(with(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "json",
            "",
            "application/",
        ] {
            assert!(!with(bad), "{bad}");
        }
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
