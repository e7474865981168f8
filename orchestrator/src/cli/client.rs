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
        Ok(Client {
            http,
            base: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            actor,
        })
    }

    /// `GET path` (with a query), answering the JSON body.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        self.send(Method::GET, path, query, None).await
    }

    /// `POST path` with a JSON body, answering the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(Method::POST, path, &[], Some(body)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
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
        let res = req
            .send()
            .await
            .map_err(|e| ClientError::Failed(format!("{method} {url}: {e}")))?;
        let status = res.status();
        let text = res
            .text()
            .await
            .map_err(|e| ClientError::Failed(format!("{method} {url}: reading the answer: {e}")))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return json.ok_or_else(|| {
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
