//! The order saga end to end: parallel steps, compensation of a declined or hanging payment,
//! and no overselling under concurrent orders for the last units.

use std::sync::Arc;

use anyhow::Result;
use sagas::orchestrator::Status;
use sagas::orchestrator::machine::StepStatus;
use sagas::participant::Operation;
use serde_json::json;
use uuid::Uuid;

use crate::examples::shop;
use crate::helpers::{self, TestEnv, spawn_app, spawn_participant};

struct Shop {
    env: TestEnv,
    app: helpers::App,
    participants: Vec<helpers::Running>,
}

impl Shop {
    async fn start(units: i32) -> Result<Shop> {
        let env = TestEnv::new().await?;
        shop::seed(&env.bank, "widget", units).await?;
        let app = spawn_app(&env, shop::registry()?).await?;
        let participants = vec![
            spawn_participant(&env, shop::ORDERS, Arc::new(shop::orders())).await?,
            spawn_participant(&env, shop::INVENTORY, Arc::new(shop::inventory())).await?,
            spawn_participant(&env, shop::PAYMENT, Arc::new(shop::payment())).await?,
        ];
        Ok(Shop {
            env,
            app,
            participants,
        })
    }

    async fn order(&self, qty: i32, simulate: Option<&str>) -> Result<Uuid> {
        let input = json!({"customer": "ada", "sku": "widget", "qty": qty, "amount": 1999,
                           "simulate": simulate});
        Ok(self.app.engine.start("order", input).await?.id)
    }

    async fn audit(&self) -> Result<shop::Audit> {
        shop::audit(&self.env.bank, &self.env.bank, &self.env.bank).await
    }

    async fn stock(&self) -> Result<(i32, i32, i32)> {
        Ok(
            sqlx::query_as("SELECT available, reserved, sold FROM shop_stock WHERE sku = 'widget'")
                .fetch_one(&self.env.bank)
                .await?,
        )
    }

    async fn stop(self) {
        for p in self.participants {
            p.stop().await;
        }
        self.app.stop().await;
        self.env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_reserves_stock_and_charges_in_parallel_then_is_confirmed() -> Result<()> {
    let s = Shop::start(10).await?;
    let id = s.order(3, None).await?;
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert!(
        done.steps
            .iter()
            .all(|st| st.status == StepStatus::Succeeded)
    );
    assert_eq!(s.stock().await?, (7, 0, 3));
    // reserve_stock and charge_payment went out together: consecutive dispatches in the log
    let events = s.app.engine.events(id).await?;
    let dispatched: Vec<(i64, usize)> = events
        .iter()
        .filter(|e| {
            e.event.kind() == "dispatched" && e.event.operation() == Some(Operation::Action)
        })
        .map(|e| (e.seq, e.event.step().unwrap()))
        .collect();
    let reserve = dispatched.iter().find(|d| d.1 == 1).unwrap();
    let charge = dispatched.iter().find(|d| d.1 == 2).unwrap();
    assert_eq!(charge.0, reserve.0 + 1, "{dispatched:?}");
    let audit = s.audit().await?;
    assert!(audit.problems.is_empty(), "{audit:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_releases_the_stock_and_cancels_the_order() -> Result<()> {
    let s = Shop::start(10).await?;
    let id = s.order(4, Some("fail")).await?;
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert!(done.failure.as_deref().unwrap().contains("card declined"));
    assert_eq!(done.steps[2].status, StepStatus::Failed);
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    assert_eq!(s.stock().await?, (10, 0, 0));
    let (status,): (String,) = sqlx::query_as("SELECT status FROM shop_orders WHERE id = $1")
        .bind(id)
        .fetch_one(&s.env.bank)
        .await?;
    assert_eq!(status, "cancelled");
    let audit = s.audit().await?;
    assert!(audit.problems.is_empty(), "{audit:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_payment_times_out_and_is_refunded_once_it_has_run() -> Result<()> {
    let s = Shop::start(10).await?;
    let id = s.order(1, Some("hang")).await?;
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert!(
        done.failure.as_deref().unwrap().contains("gave up"),
        "{done:?}"
    );
    // the charge did happen (late) and its compensation refunded it
    let (status,): (String,) =
        sqlx::query_as("SELECT status FROM shop_payments WHERE order_id = $1")
            .bind(id)
            .fetch_one(&s.env.bank)
            .await?;
    assert_eq!(status, "refunded");
    assert_eq!(s.stock().await?, (10, 0, 0));
    let audit = s.audit().await?;
    assert!(audit.problems.is_empty(), "{audit:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_for_the_last_units_never_oversell() -> Result<()> {
    let s = Shop::start(5).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(s.order(1, None).await?);
    }
    let mut completed = 0;
    for id in ids {
        match s.env.wait_terminal(id).await?.status {
            Status::Completed => completed += 1,
            Status::Compensated => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(completed, 5);
    assert_eq!(s.stock().await?, (0, 0, 5));
    let audit = s.audit().await?;
    assert!(audit.problems.is_empty(), "{audit:?}");
    s.stop().await;
    Ok(())
}
