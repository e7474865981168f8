//! One connection's worth of serving: declare, consume, take what is ready, serve it, drain.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::admission::admit;
use super::batching::{FailureRate, outcomes};
use super::outage::DatabaseOutage;
use super::replies::{publish, settle};
use super::stats::Stats;
use super::{Ended, Participant, RuntimeError};
use crate::amqp::{
    Announcement, Backoff, DeadLetters, confirm_channel, declare_participant, is_batch,
};
use crate::handler::Handler;
use crate::linger::Linger;

impl Participant {
    /// One connection's worth of serving: declare, consume, dispatch, drain.
    pub(super) async fn session(
        &self,
        conn: &Connection,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Ended, RuntimeError> {
        let consume_channel = conn.create_channel().await?;
        declare_participant(
            &consume_channel,
            &self.topology,
            &self.name,
            &self.queue_options,
        )
        .await?;
        consume_channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        // Replies and dead letters share one confirm-mode channel.
        let reply_channel = confirm_channel(conn).await?;

        let queue = self.topology.participant_queue(&self.name);
        let tag = format!("{}.{}", self.name, uuid::Uuid::new_v4().simple());
        let mut consumer = consume_channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(participant = %self.name, %queue, "participant consuming");

        let ctx = Arc::new(Context {
            participant: self.name.clone(),
            dead_letters: DeadLetters::new(reply_channel.clone(), &self.topology, queue.clone()),
            pool: self.pool.clone(),
            handler: self.handler.clone(),
            handler_timeout: self.handler_timeout,
            batch_size: self.batch_size,
            announcement: self.announcement(),
            reply_channel: reply_channel.clone(),
            stats: self.stats.clone(),
            reply_channel_lost: Notify::new(),
            failures: FailureRate::default(),
            backoff: self.reconnect_backoff,
            database: self.database.clone(),
        });
        let semaphore = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();
        // Several commands taken together (or a command batch) tell that there is something
        // to batch: the next deliveries wait the linger for more.
        let mut linger = Linger::new(self.batch_linger);

        let result = loop {
            while in_flight.try_join_next().is_some() {}
            // Take a handler slot before taking a delivery: commands beyond the slots stay
            // with the broker (up to the prefetch), which is the backpressure.
            let permit = tokio::select! {
                biased;
                () = shutdown.as_mut() => break Ok(Ended::Shutdown),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                permit = semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(Ended::Shutdown),
                },
            };
            let delivery = tokio::select! {
                biased;
                () = shutdown.as_mut() => break Ok(Ended::Shutdown),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                delivery = consumer.next() => delivery,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let (mut taken, mut permits) = (vec![delivery], permit);
                    let taking = (&mut taken, &mut permits);
                    let window = (self.batch_size, linger.until());
                    let ended = take_more(&mut consumer, &semaphore, taking, window, &queue).await;
                    linger
                        .gathered(taken.len() > 1 || taken.iter().any(|d| is_batch(&d.properties)));
                    in_flight.spawn(serve(ctx.clone(), taken, permits));
                    if let Some(error) = ended {
                        break Err(error);
                    }
                }
                Some(Err(error)) => break Err(RuntimeError::Amqp(error)),
                None => break Err(RuntimeError::ConsumerEnded(queue.clone())),
            }
        };

        if consume_channel.status().connected()
            && let Err(error) = consume_channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
        {
            tracing::warn!(%error, "could not cancel the consumer");
        }
        // Handlers in flight finish (and publish and ack) unless they outlast the deadline;
        // abandoned ones roll back and their commands, unacked, return to the queue when the
        // channel closes. On a lost connection nothing they do can be published or acked:
        // they are abandoned at once, and their commands come again on the next connection.
        let deadline = if conn.status().connected() {
            self.shutdown_timeout
        } else {
            Duration::ZERO
        };
        let drained = tokio::time::timeout(deadline, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() && deadline.is_zero() {
            tracing::debug!(
                participant = %self.name,
                abandoned = in_flight.len(),
                "the connection is lost: handlers in flight abandoned"
            );
            in_flight.shutdown().await;
        } else if drained.is_err() {
            tracing::warn!(
                participant = %self.name,
                abandoned = in_flight.len(),
                "handlers still running at the shutdown deadline were abandoned; their commands will be redelivered"
            );
            in_flight.shutdown().await;
        }
        for channel in [&consume_channel, &reply_channel] {
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
        }
        result
    }
}

/// Adds to `taken`, while a handler slot is free (merged into `permits`) and up to `max`, the
/// deliveries already there and, with `until`, those that arrive until then (one already
/// there is taken at once either way: a timeout polls its future first); returns the error if
/// the consumer ended meanwhile.
async fn take_more<T>(
    consumer: &mut (impl Stream<Item = Result<T, lapin::Error>> + Unpin),
    semaphore: &Arc<Semaphore>,
    (taken, permits): (&mut Vec<T>, &mut OwnedSemaphorePermit),
    (max, until): (usize, Option<Instant>),
    queue: &str,
) -> Option<RuntimeError> {
    while taken.len() < max {
        let Ok(permit) = semaphore.clone().try_acquire_owned() else {
            return None;
        };
        let next = match until {
            None => consumer.next().now_or_never(),
            Some(until) => tokio::time::timeout_at(until, consumer.next()).await.ok(),
        };
        match next {
            None => return None,
            Some(Some(Ok(delivery))) => {
                taken.push(delivery);
                permits.merge(permit);
            }
            Some(Some(Err(error))) => return Some(RuntimeError::Amqp(error)),
            Some(None) => return Some(RuntimeError::ConsumerEnded(queue.to_owned())),
        }
    }
    None
}

pub(super) struct Context {
    pub(super) participant: String,
    /// On the reply channel: replies and dead letters share one confirm-mode channel.
    pub(super) dead_letters: DeadLetters,
    pub(super) pool: PgPool,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) handler_timeout: Option<Duration>,
    /// The most commands run in one database transaction.
    pub(super) batch_size: usize,
    /// What every reply announces.
    pub(super) announcement: Announcement,
    pub(super) reply_channel: Channel,
    pub(super) stats: Stats,
    pub(super) reply_channel_lost: Notify,
    /// Recent batched commands' failures: whether the next batch takes savepoints.
    pub(super) failures: FailureRate,
    /// The delays between a command's runs while the database cannot be reached.
    pub(super) backoff: Backoff,
    /// Whether the database is known to be unreachable.
    pub(super) database: Arc<DatabaseOutage>,
}

/// Handles deliveries taken together, from decoding to ack; never panics on bad input.
///
/// The valid commands of all the deliveries run through the barrier in transactions of at
/// most `batch_size` commands each, one after the other (a command batch can bring many
/// more). As soon as every command of a delivery has its outcome, it is answered (see
/// [`publish`]: replies to a sender of command batches travel in reply batches, several
/// deliveries' replies in one message); the confirms are awaited only once every reply is
/// published, so that the broker confirms them together, and each delivery is acked after
/// the confirm of the message that answers it.
///
/// The deliveries hold one handler slot each, whatever the number of commands they carry:
/// a command batch runs its commands one transaction at a time, so it needs no more of the
/// database than a delivery of `batch_size` single commands. The slots are freed together
/// once every reply is published (before the confirms): freed one by one, they would be taken
/// again one by one, and the next batches would be single commands.
async fn serve(ctx: Arc<Context>, deliveries: Vec<Delivery>, permits: OwnedSemaphorePermit) {
    let mut jobs = Vec::with_capacity(deliveries.len());
    let mut taken = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        taken.push(admit(&ctx, delivery, &mut jobs).await);
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut chunks = jobs.chunks(ctx.batch_size);
    let mut published = Vec::with_capacity(taken.len());
    let mut next = 0;
    loop {
        // Jobs are in the order of their deliveries: those whose jobs all have their
        // outcomes (or that have none) can be answered now.
        let ready = next;
        while taken
            .get(next)
            .is_some_and(|t| t.jobs.end <= outcomes.len())
        {
            next += 1;
        }
        if next > ready {
            published.extend(publish(&ctx, &taken, ready..next, &jobs, &mut outcomes).await);
        }
        let Some(chunk) = chunks.next() else { break };
        outcomes.extend(self::outcomes(&ctx, chunk).await.into_iter().map(Some));
    }
    // The handlers are done and every reply is on its way: the slots go (all together) while
    // the confirms come, so that the next deliveries run meanwhile. The deliveries waiting for
    // confirms stay bounded by the prefetch.
    drop(permits);
    for (group, pending) in published {
        let span = taken[group[0]].span.clone();
        settle(&ctx, &taken, &group, pending).instrument(span).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WINDOW: Duration = Duration::from_millis(2);

    /// A consumer of the numbers sent on the returned channel (no `Err` ever comes).
    fn consumer() -> (
        tokio::sync::mpsc::UnboundedSender<u32>,
        impl Stream<Item = Result<u32, lapin::Error>> + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|n| (Ok(n), rx))
        });
        (tx, Box::pin(stream))
    }

    /// `n` handler slots, the first one taken.
    fn slots(n: usize) -> (Arc<Semaphore>, OwnedSemaphorePermit) {
        let semaphore = Arc::new(Semaphore::new(n));
        let first = semaphore.clone().try_acquire_owned().unwrap();
        (semaphore, first)
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_without_a_window_takes_only_what_is_there() {
        let (tx, mut consumer) = consumer();
        let (semaphore, mut permits) = slots(8);
        tx.send(2).unwrap();
        tx.send(3).unwrap();
        let mut taken = vec![1];
        let taking = (&mut taken, &mut permits);
        let ended = take_more(&mut consumer, &semaphore, taking, (16, None), "q").await;
        assert!(ended.is_none());
        assert_eq!(taken, vec![1, 2, 3]);
        assert_eq!(permits.num_permits(), 3, "one slot per delivery");
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_with_a_window_takes_what_arrives_within_it_and_stops_at_its_end() {
        let (tx, mut consumer) = consumer();
        let (semaphore, mut permits) = slots(8);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = tx.send(2);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(3);
        });
        let until = Instant::now() + WINDOW;
        let mut taken = vec![1];
        let taking = (&mut taken, &mut permits);
        let ended = take_more(&mut consumer, &semaphore, taking, (16, Some(until)), "q").await;
        assert!(ended.is_none());
        assert_eq!(taken, vec![1, 2]);
        assert_eq!(Instant::now(), until);
        assert_eq!(
            semaphore.available_permits(),
            6,
            "the slot taken for a third went back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_does_not_wait_without_a_free_slot_nor_once_full() {
        let (tx, mut consumer) = consumer();
        for n in 2..=4 {
            tx.send(n).unwrap();
        }
        let begun = Instant::now();
        // The first of `slots` slots taken with item 1; items taken up to `max`.
        let mut take = async |slots_held: usize, max: usize| {
            let (semaphore, mut permits) = slots(slots_held);
            let mut taken = vec![1];
            let window = (max, Some(begun + WINDOW));
            take_more(
                &mut consumer,
                &semaphore,
                (&mut taken, &mut permits),
                window,
                "q",
            )
            .await;
            taken
        };
        assert_eq!(take(2, 16).await, vec![1, 2], "two slots");
        assert_eq!(take(8, 2).await, vec![1, 3], "full at two");
        assert_eq!(Instant::now(), begun, "neither waited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_ends_while_a_take_waits_is_reported() {
        let (tx, mut consumer) = consumer();
        let (semaphore, mut permits) = slots(8);
        drop(tx);
        let mut taken = vec![1];
        let taking = (&mut taken, &mut permits);
        let window = (16, Some(Instant::now() + WINDOW));
        let ended = take_more(&mut consumer, &semaphore, taking, window, "q").await;
        assert!(
            matches!(&ended, Some(RuntimeError::ConsumerEnded(q)) if q == "q"),
            "{ended:?}"
        );
        assert_eq!(taken, vec![1]);
    }
}
