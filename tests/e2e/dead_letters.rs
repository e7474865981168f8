//! The dead-letter queue through the HTTP API and sagactl, against a real RabbitMQ: a malformed
//! reply is dead-lettered with its reason, listed without being taken, requeued to the replies
//! queue (and dead-lettered again, still malformed), dropped; unknown ids and read tokens are
//! refused.

use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use sagas::orchestrator::Registry;
use serde_json::{Value, json};

use crate::api::{OPERATE_TOKEN, READ_TOKEN, tokens};
use crate::helpers::{self, TestEnv, amqp_url, run_sagactl, spawn_app_with_api};

/// Longest any wait of these tests takes.
const WITHIN: Duration = Duration::from_secs(30);

struct Client {
    http: reqwest::Client,
    app: helpers::App,
}

impl Client {
    async fn list(&self) -> Result<Vec<Value>> {
        let res = self
            .http
            .get(self.app.url("/v1/dead-letters?limit=10"))
            .bearer_auth(READ_TOKEN)
            .send()
            .await?;
        anyhow::ensure!(res.status() == 200, "list answered {}", res.status());
        let page: Value = res.json().await?;
        Ok(page["items"].as_array().cloned().unwrap_or_default())
    }

    /// Lists until `pred` holds of the items, within [`WITHIN`].
    async fn list_until(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let items = self.list().await?;
            if pred(&items) {
                return Ok(items);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} never held: {items:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn settle(&self, id: &str, action: &str, token: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .post(self.app.url(&format!("/v1/dead-letters/{id}/{action}")))
            .bearer_auth(token)
            .json(&json!({"reason": "checked by hand"}))
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await?))
    }
}

/// Publishes `{not json` (as `application/json`) to the replies queue, as a broken participant
/// would, and waits (within [`WITHIN`]) for the broker to confirm it.
pub(crate) async fn malformed_reply(env: &TestEnv) -> Result<()> {
    let conn = tokio::time::timeout(WITHIN, Connection::connect(&amqp_url(), Default::default()))
        .await
        .context("no connection to the broker")??;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            "".into(),
            env.topology.replies_queue().as_str().into(),
            BasicPublishOptions::default(),
            b"{not json",
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await?;
    tokio::time::timeout(WITHIN, confirm).await??;
    let _ = tokio::time::timeout(WITHIN, conn.close(200, "published".into())).await;
    Ok(())
}

/// Runs sagactl with `args` against the app at `url` with `token`, off the runtime's threads,
/// within [`WITHIN`].
async fn sagactl(url: &str, token: &str, args: &[&str]) -> Result<std::process::Output> {
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["--url", url, "--token", token].map(String::from));
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_sagactl(&args)
    });
    tokio::time::timeout(WITHIN, run)
        .await
        .context("sagactl did not finish")??
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_is_listed_with_its_reason_requeued_to_its_origin_and_dropped()
-> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app_with_api(&env, Registry::new(), tokens()).await?;
    let client = Client {
        http: reqwest::Client::builder().timeout(WITHIN).build()?,
        app,
    };
    let replies = env.topology.replies_queue();
    malformed_reply(&env).await?;

    let items = client
        .list_until("one dead letter", |items| items.len() == 1)
        .await?;
    let letter = &items[0];
    let id = letter["id"].as_str().context("an id")?.to_owned();
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("malformed reply")),
        "{letter}"
    );
    assert_eq!(letter["queue"], replies.as_str(), "{letter}");
    assert_eq!(letter["body"], "{not json");
    assert_eq!(letter["body_encoding"], "utf-8");
    assert_eq!(letter["content_type"], "application/json");
    assert_eq!(letter["headers"]["x-sagas-queue"], replies.as_str());
    // Listing left it in the queue.
    let again = client.list().await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["id"], id.as_str(), "the id is stable");
    assert_eq!(again[0]["redelivered"], true);

    // sagactl shows the same.
    let url = client.app.url("");
    let out = sagactl(
        &url,
        READ_TOKEN,
        &["dead-letters", "list", "--format", "json"],
    )
    .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed["items"][0]["id"], id.as_str());
    let out = sagactl(&url, READ_TOKEN, &["dead-letters", "list"]).await?;
    let table = String::from_utf8(out.stdout)?;
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains(&id) && table.contains("malformed reply"),
        "{table}"
    );

    // A read token may look but not act; an unknown id is not found.
    let (status, body) = client.settle(&id, "drop", READ_TOKEN).await?;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    for unknown in ["h0000000000000000", "no-such-message"] {
        let (status, body) = client.settle(unknown, "requeue", OPERATE_TOKEN).await?;
        assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    }
    let (status, body) = client
        .settle("not%20an%20id", "drop", OPERATE_TOKEN)
        .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("malformed_id"))
    );
    let (status, body) = client
        .http
        .post(client.app.url(&format!("/v1/dead-letters/{id}/drop")))
        .bearer_auth(OPERATE_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))?;
    assert_eq!(status, 400, "no reason: {:?}", body.text().await?);
    assert_eq!(client.list().await?.len(), 1, "refusals changed nothing");

    // Requeued, it goes back to the replies queue, where the engine dead-letters it again.
    let (status, body) = client.settle(&id, "requeue", OPERATE_TOKEN).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id.as_str());
    let deadline = tokio::time::Instant::now() + WITHIN;
    while client
        .app
        .engine
        .stats()
        .dead_lettered
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the requeued reply was not dead-lettered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let items = client
        .list_until("the reply dead-lettered again", |items| items.len() == 1)
        .await?;
    assert_eq!(items[0]["id"], id.as_str(), "{items:#?}");
    assert!(
        items[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("malformed reply"))
    );
    assert_eq!(
        client.app.engine.transport().dead_letters().await?,
        Some(1),
        "one message in the queue"
    );

    // Dropped through sagactl, it is gone.
    let drop = ["dead-letters", "drop", &id, "--reason", "a test message"];
    let out = sagactl(&url, OPERATE_TOKEN, &drop).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.starts_with("drop: dead letter"));
    assert!(client.list().await?.is_empty());
    let (status, _) = client.settle(&id, "drop", OPERATE_TOKEN).await?;
    assert_eq!(status, 404);
    let requeue = ["dead-letters", "requeue", &id, "--reason", "again"];
    let out = sagactl(&url, OPERATE_TOKEN, &requeue).await?;
    assert_eq!(out.status.code(), Some(1), "a refusal exits 1");

    client.app.stop().await;
    env.cleanup().await;
    Ok(())
}
