//! Publishing replies and reply batches, and settling what they answer once confirmed.

use std::ops::Range;
use std::sync::atomic::Ordering;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use tracing::Instrument;

use super::admission::{Job, Taken};
use super::session::Context;
use super::stats::Stats;
use crate::amqp::{batch_properties, reply_properties};
use crate::protocol::{MAX_BATCH, Outcome, Reply, join_batch};

/// A published reply (or reply batch) whose confirm is still to come; `None` when there is
/// nothing to answer (every element of a batch was dead-lettered).
pub(super) type Pending = Result<Option<(PublisherConfirm, ShortString)>, PublishError>;

/// Publishes what answers the deliveries `ready` of `taken`, whose jobs all have their
/// outcomes (taken from `outcomes`, where each is read once); returns each message published
/// with the deliveries it answers.
///
/// Where a command batch came from a `reply_to`, the sender speaks batches: the replies of
/// every delivery from that `reply_to` (batches and single commands alike) go in reply
/// batches, up to [`MAX_BATCH`] replies each, a delivery's replies never split between two.
/// A single command from a `reply_to` that sent no batch is answered alone, as always.
pub(super) async fn publish(
    ctx: &Context,
    taken: &[Taken],
    ready: Range<usize>,
    jobs: &[Job],
    outcomes: &mut [Option<Outcome>],
) -> Vec<(Vec<usize>, Pending)> {
    let speaks_batches: Vec<&ShortString> = taken[ready.clone()]
        .iter()
        .filter(|t| t.batch)
        .filter_map(|t| t.reply_to.as_ref())
        .collect();
    let mut out = Vec::new();
    // Reply batches being filled: reply_to, the deliveries answered, the replies.
    let mut filling: Vec<(ShortString, Vec<usize>, Vec<Reply>)> = Vec::new();
    for index in ready {
        let t = &taken[index];
        let Some(reply_to) = &t.reply_to else {
            continue;
        };
        if t.lost_dead_letter {
            // It is requeued; its commands are answered from the barrier when it comes back.
            out.push((vec![index], Err(PublishError::DeadLetter)));
            continue;
        }
        let range = t.jobs.clone();
        let mut replies = Vec::with_capacity(range.len());
        let answered = outcomes[range.clone()].iter_mut().filter_map(Option::take);
        for (job, outcome) in jobs[range.clone()].iter().zip(answered) {
            job.span.in_scope(|| {
                tracing::debug!(status = outcome.status(), "command processed");
            });
            replies.push(job.cmd.reply(outcome));
        }
        if replies.is_empty() {
            out.push((vec![index], Ok(None)));
            continue;
        }
        if !speaks_batches.contains(&reply_to) {
            let job = &jobs[range.start];
            let pending = publish_reply(ctx, reply_to, job, &replies[0])
                .instrument(job.span.clone())
                .await
                .map(|confirm| Some((confirm, reply_to.clone())));
            out.push((vec![index], pending));
            continue;
        }
        let at = match filling.iter().position(|(r, ..)| r == reply_to) {
            Some(at) if filling[at].2.len() + replies.len() <= MAX_BATCH => at,
            found => {
                if let Some(full) = found {
                    let (reply_to, group, replies) = filling.swap_remove(full);
                    out.push(publish_batch(ctx, taken, reply_to, group, &replies).await);
                }
                filling.push((reply_to.clone(), Vec::new(), Vec::new()));
                filling.len() - 1
            }
        };
        filling[at].1.push(index);
        filling[at].2.extend(replies);
    }
    for (reply_to, group, replies) in filling {
        out.push(publish_batch(ctx, taken, reply_to, group, &replies).await);
    }
    out
}

/// Publishes one reply batch answering the deliveries `group`.
async fn publish_batch(
    ctx: &Context,
    taken: &[Taken],
    reply_to: ShortString,
    group: Vec<usize>,
    replies: &[Reply],
) -> (Vec<usize>, Pending) {
    let pending = publish_reply_batch(ctx, &reply_to, replies)
        .instrument(taken[group[0]].span.clone())
        .await
        .map(|confirm| Some((confirm, reply_to)));
    (group, pending)
}

/// Acks the deliveries `group` of `taken` once the message answering them is confirmed, or
/// requeues them.
pub(super) async fn settle(ctx: &Context, taken: &[Taken], group: &[usize], pending: Pending) {
    let confirmed = match pending {
        Ok(Some((confirm, reply_to))) => match confirm.await {
            Ok(confirmation) => confirmed(ctx, &reply_to, confirmation),
            Err(error) => Err(error.into()),
        },
        Ok(None) => Ok(()),
        Err(error) => Err(error),
    };
    match confirmed {
        Ok(()) => {
            for t in group.iter().map(|&i| &taken[i]) {
                ctx.stats
                    .0
                    .processed
                    .fetch_add(t.jobs.len() as u64, Ordering::Relaxed);
                if let Err(error) = t.delivery.acker.ack(BasicAckOptions::default()).await {
                    // The broker redelivers; the barrier answers with the stored reply.
                    tracing::warn!(%error, "could not ack a command");
                }
            }
        }
        Err(error) => {
            Stats::bump(&ctx.stats.0.publish_failures);
            tracing::warn!(%error, "could not publish a reply; requeueing the command");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            for t in group.iter().map(|&i| &taken[i]) {
                if let Err(error) = t.delivery.acker.nack(requeue).await {
                    tracing::warn!(%error, "could not nack a command");
                }
            }
            if !ctx.reply_channel.status().connected() {
                ctx.reply_channel_lost.notify_one();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PublishError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) the reply")]
    Nacked,
    #[error("could not encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("a malformed element of the batch could not be dead-lettered")]
    DeadLetter,
}

/// Publishes a job's reply; the confirm is awaited by [`settle`].
async fn publish_reply(
    ctx: &Context,
    reply_to: &ShortString,
    job: &Job,
    reply: &Reply,
) -> Result<PublisherConfirm, PublishError> {
    let payload = serde_json::to_vec(reply)?;
    let properties = reply_properties(reply, job.trace.as_ref(), &ctx.announcement);
    publish_to(ctx, reply_to, &payload, properties).await
}

/// Publishes a reply (or reply batch) to `reply_to` through the default exchange, `mandatory`
/// so that a missing queue is reported; the confirm is awaited by [`settle`].
async fn publish_to(
    ctx: &Context,
    reply_to: &ShortString,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, PublishError> {
    let confirm = ctx
        .reply_channel
        .basic_publish(
            "".into(),
            reply_to.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            properties,
        )
        .await?;
    Ok(confirm)
}

/// Publishes replies, in order, as one reply batch; the confirm is awaited by [`settle`].
async fn publish_reply_batch(
    ctx: &Context,
    reply_to: &ShortString,
    replies: &[Reply],
) -> Result<PublisherConfirm, PublishError> {
    let encoded = replies
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    let payload = join_batch(encoded.iter().map(Vec::as_slice));
    let first = replies.first().map(Reply::message_id).unwrap_or_default();
    let properties = ctx
        .announcement
        .stamp(batch_properties(&first, replies.len()));
    publish_to(ctx, reply_to, &payload, properties).await
}

/// Whether a confirmation means the reply is delivered (or can never be).
fn confirmed(
    ctx: &Context,
    reply_to: &ShortString,
    confirmation: Confirmation,
) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_returned)) => {
            // Nobody can take the reply now; requeueing would loop. The orchestrator's timeout
            // resends the command and the barrier answers again.
            Stats::bump(&ctx.stats.0.unroutable_replies);
            tracing::warn!(%reply_to, "reply unroutable (no such queue); dropped");
            Ok(())
        }
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}
