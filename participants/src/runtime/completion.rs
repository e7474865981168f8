//! Answering after the command was acked: the final outcome of an `in_progress` operation.

use lapin::options::BasicPublishOptions;
use lapin::{Confirmation, Connection};
use sqlx::PgPool;

use super::RuntimeError;
use crate::amqp::{Announcement, confirm_channel, reply_properties};
use crate::barrier::{self, BarrierError};
use crate::protocol::{Command, Outcome, Reply, Topology};

/// Publishes `reply` to the orchestrator's replies queue with a publisher confirm: the way to
/// answer after the command itself was acknowledged (the final outcome of an `in_progress`
/// operation). It carries `from`, the participant's
/// [`Participant::announcement`](super::Participant::announcement), as every reply of the
/// runtime does: a reply without it would make the orchestrator send that participant single
/// commands only, for a while (docs/protocol.md, "Batches").
pub async fn send_reply(
    conn: &Connection,
    topology: &Topology,
    from: &Announcement,
    reply: &Reply,
) -> Result<(), RuntimeError> {
    let channel = confirm_channel(conn).await?;
    let body = serde_json::to_vec(reply).map_err(|e| RuntimeError::NotConfirmed(e.to_string()))?;
    let properties = reply_properties(reply, None, from);
    let confirmation = channel
        .basic_publish(
            "".into(),
            topology.replies_queue().as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            properties,
        )
        .await?
        .await?;
    let _ = channel.close(200, "reply sent".into()).await;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(RuntimeError::NotConfirmed(format!(
            "no queue {} to take it",
            topology.replies_queue()
        ))),
        Confirmation::Nack(_) => Err(RuntimeError::NotConfirmed("nacked".into())),
    }
}

/// Finishes a long-running operation that answered `in_progress`: records `outcome` in the
/// barrier and sends the reply, announcing `from` (see [`send_reply`]). When the business writes
/// that finish the work must commit with the barrier, use [`barrier::complete_in`] in your
/// transaction and then [`send_reply`].
///
/// Returns [`barrier::Completion::Undone`] (and sends nothing) when the step was compensated
/// or cancelled first: the work must then not take effect.
pub async fn complete(
    pool: &PgPool,
    conn: &Connection,
    topology: &Topology,
    from: &Announcement,
    cmd: &Command,
    outcome: Outcome,
) -> Result<barrier::Completion, RuntimeError> {
    let mut tx = pool.begin().await.map_err(BarrierError::from)?;
    let done = barrier::complete_in(&mut tx, cmd, &outcome).await?;
    let reply = match &done {
        barrier::Completion::Undone => {
            tx.rollback().await.map_err(BarrierError::from)?;
            return Ok(done);
        }
        barrier::Completion::Completed => cmd.reply(outcome),
        barrier::Completion::AlreadyFinal(stored) => cmd.reply(stored.clone()),
    };
    tx.commit().await.map_err(BarrierError::from)?;
    send_reply(conn, topology, from, &reply).await?;
    Ok(done)
}
