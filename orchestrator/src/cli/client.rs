//! A small client of the orchestrator's HTTP API.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::args::ApiArgs;

/// Why a request did not give an answer the command can use.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (4xx): the request was refused.
    #[error("the server refused: {message} ({status}, {code})")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The API's stable error code.
        code: String,
        /// The API's message.
        message: String,
    },
    /// The server could not be reached, failed (5xx), or answered something unexpected.
    #[error("{0}")]
    Failed(String),
}

/// The API's base URL when none is given: where `sagad` listens with the same environment
/// (`SAGAS_BIND`, `host:port`), a wildcard host replaced by loopback; else the default bind.
fn base_url(bind: Option<&str>) -> String {
    let bind = bind.map(str::trim).filter(|b| !b.is_empty());
    let Some(bind) = bind else {
        return format!("http://{}", crate::config::DEFAULT_BIND);
    };
    let bind = match bind.rsplit_once(':') {
        Some(("0.0.0.0", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => bind.to_owned(),
    };
    format!("http://{bind}")
}

/// The API at one base URL, with a token and an actor.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    actor: Option<String>,
}

impl Client {
    /// A client as the command line says.
    pub fn new(args: &ApiArgs) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("sagactl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Failed(format!("building the HTTP client: {e}")))?;
        let actor = args
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .filter(|a| !a.trim().is_empty());
        let base = args
            .url
            .clone()
            .unwrap_or_else(|| base_url(std::env::var("SAGAS_BIND").ok().as_deref()));
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            actor,
        })
    }

    /// `GET path` (with a query), answering the JSON body.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        Ok(self.send(Method::GET, path, query, None).await?.1)
    }

    /// `POST path` with a JSON body, answering the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self.send(Method::POST, path, &[], Some(body)).await?.1)
    }

    /// `PUT path` with a JSON body, answering the status (200 and 201 differ) and JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> Result<(StatusCode, Value), ClientError> {
        self.send(Method::PUT, path, &[], Some(body)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url).query(query);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(actor) = &self.actor {
            req = req.header("X-Sagas-Actor", actor);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let res = req.send().await.map_err(|e| {
            let hint = if e.is_connect() {
                " (is the orchestrator running there? `--url` or SAGAS_URL names it; without \
                 them sagactl uses SAGAS_BIND, as sagad does, else 127.0.0.1:8080)"
            } else {
                ""
            };
            ClientError::Failed(format!("{method} {url}: {e}{hint}"))
        })?;
        let status = res.status();
        let text = res
            .text()
            .await
            .map_err(|e| ClientError::Failed(format!("{method} {url}: reading the answer: {e}")))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return json.map(|json| (status, json)).ok_or_else(|| {
                ClientError::Failed(format!("{method} {url} answered {status} without JSON"))
            });
        }
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        match (field("error"), field("message")) {
            (Some(code), Some(message))
                if status.is_client_error() && status != StatusCode::UNAUTHORIZED =>
            {
                Err(ClientError::Refused {
                    status,
                    code,
                    message,
                })
            }
            (_, Some(message)) => Err(ClientError::Failed(format!(
                "{method} {url} answered {status}: {message}"
            ))),
            _ if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => {
                Err(ClientError::Failed(format!(
                    "{method} {url} answered {status}: this server does not have that endpoint \
                     (is it an older sagad, or is --url not the orchestrator?)"
                )))
            }
            _ if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN => {
                Err(ClientError::Failed(format!(
                    "{method} {url} answered {status}: check --token / SAGAS_TOKEN"
                )))
            }
            _ => Err(ClientError::Failed(format!(
                "{method} {url} answered {status}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::base_url;

    #[test]
    fn without_a_url_the_client_goes_where_sagad_listens_with_the_same_environment() {
        assert_eq!(base_url(None), "http://127.0.0.1:8080");
        assert_eq!(base_url(Some("")), "http://127.0.0.1:8080");
        assert_eq!(base_url(Some("127.0.0.1:9000")), "http://127.0.0.1:9000");
        assert_eq!(base_url(Some("0.0.0.0:9000")), "http://127.0.0.1:9000");
        assert_eq!(base_url(Some("[::]:9000")), "http://[::1]:9000");
        assert_eq!(
            base_url(Some("orch.internal:80")),
            "http://orch.internal:80"
        );
    }
}
