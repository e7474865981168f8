//! The web console at `/ui`: its pages and their guards over HTTP, then a real browser
//! (headless Chromium driven over WebDriver) logging in, finding a stuck transaction from the
//! overview, resolving it and reading the action back in the page's log, then the other pages
//! (a dead letter among them).
//!
//! `SAGAS_CONSOLE_SCREENSHOTS=DIR` saves a PNG of each page the browser visits in `DIR`
//! (docs/console/ holds the ones the documentation shows).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{ClientBuilder, Locator};
use lapin::Connection;
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use sagas::orchestrator::api::ApiOptions;
use sagas::orchestrator::machine::Input;
use sagas::orchestrator::{Definition, Registry, Status};
use serde_json::json;
use uuid::Uuid;

use crate::api::{OPERATE_TOKEN, READ_TOKEN, one_step, scripted_participant, tokens};
use crate::helpers::{self, App, TestEnv, spawn_app_with_api};

/// The definition whose transactions the tests make stuck.
const DEFINITION: &str = "console_saga";

/// Longest wait for anything a page should come to show.
const WITHIN: Duration = Duration::from_secs(30);

/// Longest wait for anything the browser shows.
const BROWSER_WAIT: Duration = Duration::from_secs(15);

/// An orchestrator serving the console, with the scripted participant of the API tests.
struct Console {
    env: TestEnv,
    app: App,
    participant: (Connection, tokio::task::JoinHandle<()>),
    /// Follows no redirect: the tests look at them.
    http: reqwest::Client,
}

/// A saga whose steps run in parallel where they can, for the definitions page (nothing
/// starts it).
fn parallel() -> Result<Definition> {
    Ok(Definition::saga::<serde_json::Value>("console_order", 1)
        .step("reserve", "inventory", |s| s.command(|_, _| json!({})))
        .step("charge", "payment", |s| {
            s.command(|_, _| json!({})).after(Vec::<String>::new())
        })
        .step("ship", crate::api::PARTICIPANT, |s| {
            s.command(|_, _| json!({})).after(["reserve", "charge"])
        })
        .build()?)
}

impl Console {
    async fn start(options: ApiOptions) -> Result<Console> {
        let env = TestEnv::new().await?;
        let participant = scripted_participant(&env).await?;
        let registry = Registry::new()
            .with(one_step(DEFINITION)?)?
            .with(parallel()?)?;
        let app = spawn_app_with_api(&env, registry, options).await?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Console {
            env,
            app,
            participant,
            http,
        })
    }

    async fn stop(self) {
        self.app.stop().await;
        self.participant.1.abort();
        let _ = self.participant.0.close(200, "done".into()).await;
        self.env.cleanup().await;
    }

    /// The origin a browser on the console sends.
    fn origin(&self) -> String {
        format!("http://{}", self.app.addr)
    }

    /// A transaction of [`DEFINITION`] with this script for the participant.
    async fn begin(&self, script: serde_json::Value) -> Result<Uuid> {
        Ok(self.app.engine.start(DEFINITION, script).await?.id)
    }

    /// A transaction made stuck: aborted, its compensation refused.
    async fn stuck(&self) -> Result<Uuid> {
        let id = self.begin(json!({"answer": false, "stuck": true})).await?;
        let abort = Input::Abort {
            actor: "support".into(),
            reason: "the customer cancelled the order".into(),
        };
        self.app.engine.operate(id, abort).await?;
        helpers::wait_status(&self.env, id, Status::Stuck).await?;
        Ok(id)
    }

    async fn status(&self, id: Uuid) -> Result<Status> {
        Ok(self
            .app
            .engine
            .get(id)
            .await?
            .context("instance")?
            .instance
            .status)
    }

    /// The cookie a login with `token` sets (as the browser sends it back).
    async fn login(&self, token: &str) -> Result<String> {
        let res = self
            .http
            .post(self.app.url("/ui/login"))
            .header(ORIGIN, self.origin())
            .form(&[("token", token), ("next", "/ui")])
            .send()
            .await?;
        anyhow::ensure!(res.status() == 303, "login answered {}", res.status());
        let set = res
            .headers()
            .get(SET_COOKIE)
            .context("no cookie set")?
            .to_str()?
            .to_owned();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
            anyhow::ensure!(set.contains(attribute), "{set} lacks {attribute}");
        }
        Ok(set.split(';').next().unwrap_or_default().to_owned())
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Result<(u16, String)> {
        let mut req = self.http.get(self.app.url(path));
        if let Some(c) = cookie {
            req = req.header(COOKIE, c);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap_or_default().to_owned());
        let text = res.text().await?;
        Ok((status, location.unwrap_or(text)))
    }

    /// Gets `path` with `cookie` until its page contains `text`, within [`WITHIN`].
    async fn until(&self, path: &str, cookie: &str, text: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let (status, page) = self.get(path, Some(cookie)).await?;
            if status == 200 && page.contains(text) {
                return Ok(page);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{path} never showed {text:?}: {status} {page}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts an action's form to `path` with `cookie`, from `origin` (none: no `Origin`); the
    /// status, and the page or where it sends the browser.
    async fn post(
        &self,
        path: &str,
        reason: &str,
        cookie: &str,
        origin: Option<&str>,
    ) -> Result<(u16, String)> {
        let mut req = self
            .http
            .post(self.app.url(path))
            .header(COOKIE, cookie)
            .form(&[("reason", reason)]);
        if let Some(o) = origin {
            req = req.header(ORIGIN, o);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap_or_default().to_owned());
        let text = res.text().await?;
        Ok((status, location.unwrap_or(text)))
    }

    /// Posts an operator action's form with `cookie`, from `origin` (none: no `Origin`).
    async fn act(
        &self,
        id: Uuid,
        action: &str,
        reason: &str,
        cookie: &str,
        origin: Option<&str>,
    ) -> Result<(u16, String)> {
        let path = format!("/ui/transactions/{id}/{action}");
        self.post(&path, reason, cookie, origin).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_a_page_without_a_cookie_sends_the_browser_to_the_login_page() -> Result<()> {
    let c = Console::start(tokens()).await?;
    let (status, to) = c.get("/ui/transactions?status=stuck", None).await?;
    assert_eq!(
        (status, to.as_str()),
        (303, "/ui/login?next=/ui/transactions%3Fstatus%3Dstuck")
    );
    let (status, page) = c.get("/ui/login", None).await?;
    assert_eq!(status, 200);
    assert!(page.contains(r#"name="token""#), "{page}");
    // A wrong token is refused; an unknown cookie is no login either.
    let res = c
        .http
        .post(c.app.url("/ui/login"))
        .header(ORIGIN, c.origin())
        .form(&[("token", "not-a-token-at-all")])
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    let (status, _) = c.get("/ui", Some("sagas_console=00ff")).await?;
    assert_eq!(status, 303);
    // A bearer header is as good as the cookie.
    let res = c
        .http
        .get(c.app.url("/ui/definitions"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_answers_a_logged_in_reader_and_escapes_what_transactions_carry() -> Result<()> {
    let c = Console::start(tokens()).await?;
    let id = c
        .begin(json!({"answer": false, "note": "<script>alert(1)</script>"}))
        .await?;
    let cookie = c.login(READ_TOKEN).await?;
    for path in [
        "/ui",
        "/ui/transactions",
        "/ui/definitions",
        "/ui/transactions?status=running",
        "/ui/dead-letters",
    ] {
        let (status, page) = c.get(path, Some(&cookie)).await?;
        assert_eq!(status, 200, "{path}: {page}");
        assert!(page.contains("<nav>"), "{path} has no navigation bar");
    }
    let (status, page) = c
        .get(&format!("/ui/transactions/{id}"), Some(&cookie))
        .await?;
    assert_eq!(status, 200, "{page}");
    assert!(
        !page.contains("<script>"),
        "a payload rendered as markup: {page}"
    );
    assert!(page.contains("&lt;script&gt;"), "{page}");
    // A read token sees the forms disabled.
    assert!(
        page.contains("operator actions need an operate token"),
        "{page}"
    );
    assert!(page.contains("<fieldset disabled>"), "{page}");
    // Its action awaits a reply (or is still to be published): no time for a fix by hand.
    assert!(page.contains("Not safe to fix by hand now"), "{page}");
    let (status, to) = c
        .get(&format!("/ui/transactions?id={id}"), Some(&cookie))
        .await?;
    assert_eq!((status, to), (303, format!("/ui/transactions/{id}")));
    let (status, _) = c
        .get(
            &format!("/ui/transactions/{}", Uuid::now_v7()),
            Some(&cookie),
        )
        .await?;
    assert_eq!(status, 404);
    let (status, _) = c.get("/ui/transactions/not-an-id", Some(&cookie)).await?;
    assert_eq!(status, 400);
    let (status, page) = c
        .get("/ui/transactions?created_after=yesterday", Some(&cookie))
        .await?;
    assert_eq!(status, 400);
    assert!(page.contains("created_after"), "{page}");
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cookie_cannot_resolve_and_neither_can_a_post_from_another_origin() -> Result<()> {
    let c = Console::start(tokens()).await?;
    let id = c.stuck().await?;
    let read = c.login(READ_TOKEN).await?;
    let operate = c.login(OPERATE_TOKEN).await?;
    let origin = c.origin();
    // Once the refused compensation has settled, nothing is in flight.
    let path = format!("/ui/transactions/{id}");
    let page = c
        .until(&path, &read, "Nothing in flight: safe to fix by hand")
        .await?;
    assert!(!page.contains("settled by hand"), "{page}");
    let (status, page) = c
        .act(id, "resolve", "by hand", &read, Some(&origin))
        .await?;
    assert_eq!(status, 403, "{page}");
    for (from, cookie) in [(Some("http://evil.example"), &operate), (None, &operate)] {
        let (status, page) = c.act(id, "resolve", "by hand", cookie, from).await?;
        assert_eq!(status, 403, "{from:?}: {page}");
    }
    // A cross-site fetch metadata header wins over a matching Origin.
    let res = c
        .http
        .post(c.app.url(&format!("/ui/transactions/{id}/resolve")))
        .header(COOKIE, &operate)
        .header(ORIGIN, &origin)
        .header("sec-fetch-site", "cross-site")
        .form(&[("reason", "by hand")])
        .send()
        .await?;
    assert_eq!(res.status(), 403);
    assert_eq!(c.status(id).await?, Status::Stuck);

    // From the console with an operate cookie: a blank reason is refused, a conflict says
    // why, and a resolve is done and logged with who and why.
    let (status, _) = c.act(id, "resolve", "  ", &operate, Some(&origin)).await?;
    assert_eq!(status, 400);
    let (status, page) = c.act(id, "abort", "stop", &operate, Some(&origin)).await?;
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("abort refused (409)"), "{page}");
    let (status, to) = c
        .act(id, "resolve", "refunded by hand", &operate, Some(&origin))
        .await?;
    assert_eq!(status, 303, "{to}");
    assert_eq!(c.status(id).await?, Status::Resolved);
    let (status, page) = c
        .get(
            &format!("/ui/transactions/{id}?done=resolve"),
            Some(&operate),
        )
        .await?;
    assert_eq!(status, 200);
    assert!(
        page.contains("resolve by oncall: refunded by hand"),
        "{page}"
    );
    // The stuck step is marked as the one the resolve settled.
    assert!(
        page.contains(r#"<span class="badge hand">settled by hand</span>"#),
        "{page}"
    );
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_two_stuck_transactions_of_one_cause_as_one_group_of_two() -> Result<()>
{
    let c = Console::start(tokens()).await?;
    let first = c.stuck().await?;
    let second = c.stuck().await?;
    let cookie = c.login(READ_TOKEN).await?;
    let (status, page) = c.get("/ui", Some(&cookie)).await?;
    assert_eq!(status, 200, "{page}");
    let (_, groups) = page
        .split_once(r#"<table class="causes">"#)
        .context("no stuck groups on the overview")?;
    let (groups, _) = groups.split_once("</table>").context("an unclosed table")?;
    assert_eq!(
        groups.matches("<tr>").count(),
        2,
        "a head and one group: {groups}"
    );
    for text in [
        DEFINITION,
        "hold",
        crate::api::PARTICIPANT,
        "cannot undo this",
        r#"<td class="count">2</td>"#,
    ] {
        assert!(groups.contains(text), "no {text:?} in {groups}");
    }
    for id in [first, second] {
        assert!(
            groups.contains(&format!(r#"href="/ui/transactions/{id}""#)),
            "no link to {id} in {groups}"
        );
    }
    c.stop().await;
    Ok(())
}

/// The id of the first dead letter a dead-letters page lists.
fn first_letter(page: &str) -> Result<String> {
    let (_, rest) = page
        .split_once(r#"id="letter-"#)
        .context("no dead letter listed")?;
    Ok(rest.split('"').next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letters_page_lists_a_malformed_reply_which_only_an_operate_cookie_from_the_console_drops()
-> Result<()> {
    let c = Console::start(tokens()).await?;
    crate::dead_letters::malformed_reply(&c.env).await?;
    let read = c.login(READ_TOKEN).await?;
    let operate = c.login(OPERATE_TOKEN).await?;
    let origin = c.origin();
    let page = c
        .until("/ui/dead-letters", &read, "malformed reply")
        .await?;
    let replies = c.env.topology.replies_queue();
    for text in [
        "{not json",
        "application/json",
        replies.as_str(),
        "<fieldset disabled>",
    ] {
        assert!(page.contains(text), "no {text:?} in {page}");
    }
    let id = first_letter(&page)?;
    let drop_form = format!("/ui/dead-letters/{id}/drop");

    // A read cookie, another origin, no origin, no reason: refused, the message stays.
    let (status, page) = c.post(&drop_form, "checked", &read, Some(&origin)).await?;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("drop of"), "{page}");
    for from in [Some("http://evil.example"), None] {
        let (status, page) = c.post(&drop_form, "checked", &operate, from).await?;
        assert_eq!(status, 403, "{from:?}: {page}");
    }
    let (status, page) = c.post(&drop_form, " ", &operate, Some(&origin)).await?;
    assert_eq!(status, 400, "{page}");
    assert_eq!(first_letter(&page)?, id, "still listed");

    // From the console with an operate cookie: dropped, then gone.
    let (status, to) = c
        .post(
            &drop_form,
            "a broken participant's test message",
            &operate,
            Some(&origin),
        )
        .await?;
    assert_eq!(
        (status, to.as_str()),
        (303, format!("/ui/dead-letters?done=drop&id={id}").as_str())
    );
    let (status, page) = c.get(&to, Some(&operate)).await?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Done: drop"), "{page}");
    assert!(page.contains("The dead-letter queue is empty."), "{page}");
    let (status, page) = c.post(&drop_form, "again", &operate, Some(&origin)).await?;
    assert_eq!(status, 404, "{page}");
    assert!(page.contains("refused (404)"), "{page}");
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_console_opens_without_a_login() -> Result<()> {
    let c = Console::start(ApiOptions::default()).await?;
    let (status, page) = c.get("/ui", None).await?;
    assert_eq!(status, 200, "{page}");
    let (status, page) = c.get("/ui/login", None).await?;
    assert_eq!(status, 200);
    assert!(page.contains("No tokens are configured"), "{page}");
    c.stop().await;
    Ok(())
}

// --- A real browser ------------------------------------------------------------------------------

/// A chromedriver of this test's own, killed when dropped (on failure too).
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Chromedriver {
    /// Starts `chromedriver` on a free port and waits (bounded) until it listens.
    async fn start() -> Result<Chromedriver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "chromedriver is not installed: scripts/test installs Debian's chromium and \
                 chromium-driver (apt-get install chromium chromium-driver)",
            )?;
        let driver = Chromedriver { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(driver)
    }

    /// A headless Chromium session, 1280×800.
    async fn browser(&self) -> Result<fantoccini::Client> {
        let options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--window-size=1280,800",
                "--hide-scrollbars",
            ]
        });
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(30),
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .context("no browser session within 30 s")??;
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(Duration::from_secs(10)),
                Some(Duration::from_secs(20)),
                Some(Duration::ZERO),
            ))
            .await?;
        Ok(client)
    }
}

/// Where screenshots go, if anywhere.
fn screenshots() -> Option<PathBuf> {
    std::env::var_os("SAGAS_CONSOLE_SCREENSHOTS").map(PathBuf::from)
}

async fn shoot(browser: &fantoccini::Client, name: &str) -> Result<()> {
    if let Some(dir) = screenshots() {
        std::fs::create_dir_all(&dir)?;
        let png = browser.screenshot().await?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
    }
    Ok(())
}

async fn element(browser: &fantoccini::Client, css: &str) -> Result<fantoccini::elements::Element> {
    let found = browser
        .wait()
        .at_most(BROWSER_WAIT)
        .for_element(Locator::Css(css))
        .await;
    match found {
        Ok(e) => Ok(e),
        Err(e) => {
            let at = browser.current_url().await.ok();
            Err(e).with_context(|| format!("no {css} on {at:?}"))
        }
    }
}

/// The browser's walk: log in, the overview, the stuck transaction, resolve it, the log, and
/// the other pages.
async fn walk(browser: &fantoccini::Client, c: &Console, stuck: Uuid) -> Result<()> {
    browser.goto(&c.app.url("/ui")).await?;
    element(browser, "form.login").await?;
    shoot(browser, "login").await?;
    element(browser, "input#token")
        .await?
        .send_keys(OPERATE_TOKEN)
        .await?;
    element(browser, "form.login button").await?.click().await?;

    element(browser, "section.cards").await?;
    shoot(browser, "overview").await?;
    element(browser, &format!("a[href='/ui/transactions/{stuck}']"))
        .await?
        .click()
        .await?;

    let reason = "refunded by hand, ticket 7";
    element(browser, "textarea#reason-resolve")
        .await?
        .send_keys(reason)
        .await?;
    element(browser, "form[action$='/resolve'] button")
        .await?
        .click()
        .await?;
    let done = element(browser, "p.alert.ok").await?.text().await?;
    assert!(done.contains("resolve"), "{done}");
    let actions = element(browser, "table.actions").await?.text().await?;
    assert!(
        actions.contains("resolve") && actions.contains("oncall") && actions.contains(reason),
        "the log's operator actions: {actions}"
    );
    let log = element(browser, "table.log").await?.text().await?;
    assert!(
        log.contains(&format!("resolve by oncall: {reason}")),
        "{log}"
    );
    let steps = element(browser, "section.step h3").await?.text().await?;
    assert!(steps.contains("settled by hand"), "{steps}");
    shoot(browser, "transaction").await?;

    browser.goto(&c.app.url("/ui/transactions")).await?;
    element(browser, "table.list").await?;
    shoot(browser, "transactions").await?;
    browser.goto(&c.app.url("/ui/definitions")).await?;
    element(browser, "section.definition").await?;
    shoot(browser, "definitions").await?;
    browser.goto(&c.app.url("/ui/dead-letters")).await?;
    let letter = element(browser, "section.letter").await?.text().await?;
    assert!(letter.contains("malformed reply"), "{letter}");
    shoot(browser, "dead-letters").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_an_operator_logs_in_finds_the_stuck_transaction_and_resolves_it() -> Result<()>
{
    let driver = Chromedriver::start().await?;
    let c = Console::start(tokens()).await?;
    // Something to show: one completed, one running, one stuck.
    let completed = c.begin(json!({"answer": true})).await?;
    c.env.wait_terminal(completed).await?;
    c.begin(json!({"answer": false})).await?;
    let stuck = c.stuck().await?;
    // And a message in the dead-letter queue, listed before the browser looks.
    crate::dead_letters::malformed_reply(&c.env).await?;
    let read = c.login(READ_TOKEN).await?;
    c.until("/ui/dead-letters", &read, "malformed reply")
        .await?;

    let browser = driver.browser().await?;
    let walked = tokio::time::timeout(Duration::from_secs(90), walk(&browser, &c, stuck)).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), browser.close()).await;
    walked.context("the browser's walk took over 90 s")??;
    assert_eq!(c.status(stuck).await?, Status::Resolved);
    c.stop().await;
    drop(driver);
    Ok(())
}
