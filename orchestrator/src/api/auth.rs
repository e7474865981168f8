//! Bearer-token authentication: who calls, and whether their role allows the route.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::{ApiToken, Role};

/// The configured tokens. Empty: every request is let through as an unauthenticated operator
/// (the server only allows that on loopback, see [`crate::config::Config::check`]).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<ApiToken>,
}

/// Who made a request, as the guard established it (a request extension on guarded routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; `None` when the API is unauthenticated.
    pub name: Option<String>,
    /// What the caller may do.
    pub role: Role,
}

impl Auth {
    /// Authentication with these tokens.
    pub fn new(tokens: Vec<ApiToken>) -> Auth {
        Auth { tokens }
    }

    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The token equal to `presented`. Every configured token is compared, each in constant
    /// time, so the time taken does not tell how much of a token matched (only, at most,
    /// whether some token has the presented length).
    pub fn find(&self, presented: &[u8]) -> Option<&ApiToken> {
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.token.as_bytes().ct_eq(presented)) {
                found = Some(t);
            }
        }
        found
    }

    /// The caller presenting `token` (as a bearer token or the console's cookie), if it is
    /// one of the configured tokens.
    pub fn caller_of(&self, token: &[u8]) -> Option<Caller> {
        self.find(token).map(|t| Caller {
            name: Some(t.name.clone()),
            role: t.role,
        })
    }

    /// The caller of a request with these headers, or the 401 to answer.
    pub fn caller(&self, headers: &axum::http::HeaderMap) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller {
                name: None,
                role: Role::Operate,
            });
        }
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Err(unauthorized(
                "Bearer",
                "an Authorization: Bearer <token> header is required",
            ));
        };
        let presented = bearer_token(value.as_bytes());
        let Some(presented) = presented else {
            return Err(unauthorized(
                "Bearer",
                "the Authorization header must be Bearer <token>",
            ));
        };
        self.caller_of(presented).ok_or_else(|| {
            unauthorized(
                "Bearer error=\"invalid_token\"",
                "the bearer token is not valid",
            )
        })
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110, section 11.1) and may be followed by more than one space.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii()).filter(|t| !t.is_empty())
}

fn unauthorized(challenge: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        .with_header(WWW_AUTHENTICATE, HeaderValue::from_static(challenge))
}

/// State of [`guard`]: the tokens and the role a route needs.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The tokens.
    pub auth: Arc<Auth>,
    /// The role the guarded routes need.
    pub needs: Role,
}

/// Middleware: 401 without a valid token, 403 when its role is not enough; otherwise the
/// request goes on with its [`Caller`] in the extensions.
pub async fn guard(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let caller = match guard.auth.caller(request.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !caller.role.allows(guard.needs) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs a token with the {} role; this one has {}",
                guard.needs.as_str(),
                caller.role.as_str()
            ),
        )
        .into_response();
    }
    if let Some(name) = &caller.name {
        tracing::Span::current().record("caller", name.as_str());
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_the_token_is_what_follows() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR   tok "] {
            assert_eq!(bearer_token(value.as_bytes()), Some(&b"tok"[..]), "{value}");
        }
        for value in [
            "Bearer",
            "Bearer ",
            "Basic tok",
            "Bearertok",
            "Token tok",
            "",
        ] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value}");
        }
    }
}
