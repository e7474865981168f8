//! The reply consumer: replies committed in batches, their commands published, then each
//! reply acked, requeued or dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Engine, EngineError};
use crate::machine::Input;
use crate::transport::Incoming;
use sagas_participant::linger::Linger;
use sagas_participant::protocol::{PROTOCOL_VERSION, Reply};

impl Engine {
    /// Takes replies off the broker in batches, one batch per free slot, until `shutdown`;
    /// a batch waits [`EngineConfig::batch_linger`](super::EngineConfig::batch_linger) for
    /// more only after a batch of several ([`Linger`]).
    pub(super) async fn consume(
        self: Arc<Self>,
        mut replies: tokio::sync::mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.reply_concurrency));
        let limit = self.config.reply_batch.max(1);
        let mut in_flight = tokio::task::JoinSet::new();
        let mut linger = Linger::new(self.config.batch_linger);
        loop {
            while in_flight.try_join_next().is_some() {}
            // A slot first: while every slot is busy, replies gather in the channel and the
            // next batch takes them all (up to the limit), so batches grow with the load;
            // after a batch of several, it also waits the linger for more.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = replies.recv() => match m { Some(m) => m, None => break },
            };
            let mut batch = vec![first];
            linger.fill(&mut batch, limit, &mut replies).await;
            let engine = self.clone();
            in_flight.spawn(async move {
                engine.on_replies(batch, permit).await;
            });
        }
        // Let batches in flight finish so their acks go out.
        while in_flight.join_next().await.is_some() {}
    }

    /// Handles one batch of received replies as the consumer does. Public for the
    /// deterministic simulation, which takes replies off its broker itself.
    #[doc(hidden)]
    pub async fn handle_replies(&self, batch: Vec<Incoming>) {
        let Ok(slot) = Arc::new(Semaphore::new(1)).try_acquire_owned() else {
            return;
        };
        self.on_replies(batch, slot).await;
    }

    /// Handles a batch of replies: one store transaction for all, then the commands they
    /// caused are published (pipelined), then each reply is settled.
    ///
    /// `slot` is held until the transaction ends: the slots bound the store transactions, and
    /// while the batch's commands are published and its replies acked, the next batch commits.
    async fn on_replies(&self, batch: Vec<Incoming>, slot: tokio::sync::OwnedSemaphorePermit) {
        let mut replies = Vec::with_capacity(batch.len());
        for incoming in batch {
            let reply: Reply = match serde_json::from_slice(&incoming.body) {
                Ok(r) => r,
                Err(e) => {
                    let reason = format!("malformed reply: {e}");
                    self.dead_letter(incoming, &reason).await;
                    continue;
                }
            };
            if reply.protocol != PROTOCOL_VERSION {
                let reason = format!("unknown protocol version {}", reply.protocol);
                self.dead_letter(incoming, &reason).await;
                continue;
            }
            replies.push((reply, incoming));
        }
        if replies.is_empty() {
            return;
        }
        let now = self.clock.now();
        let (items, replies): (Vec<_>, Vec<_>) = replies
            .into_iter()
            .map(|(reply, incoming)| {
                let id = reply.transaction_id;
                ((id, self.decider(Input::Reply(reply), now)), (id, incoming))
            })
            .unzip();
        let results = match self.store.update_batch(now, items).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, replies = replies.len(), "replies not committed; they will be redelivered");
                // The slot stays taken meanwhile: backpressure while the database fails.
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (_, incoming) in replies {
                    let _ = incoming.ack.requeue().await;
                }
                return;
            }
        };
        drop(slot);
        self.stats.count_reply_batch(replies.len());
        let mut outbox = Vec::new();
        let mut settled = Vec::with_capacity(replies.len());
        for ((id, incoming), result) in replies.into_iter().zip(results) {
            let result = match result {
                Ok(updated) => {
                    self.committed(&updated.transition, now);
                    outbox.extend(updated.outbox);
                    Ok(())
                }
                Err(e) => Err(EngineError::from(e)),
            };
            settled.push((id, incoming, result));
        }
        self.publish(outbox).await;
        for (id, incoming, result) in settled {
            self.settle(id, incoming, result).await;
        }
    }

    /// Acks a committed reply, dead-letters one for an unknown instance, requeues the others.
    async fn settle(&self, id: Uuid, incoming: Incoming, result: Result<(), EngineError>) {
        match result {
            Ok(()) => {
                self.stats.count_reply();
                if let Err(e) = incoming.ack.ack().await {
                    // The reply comes again and is then ignored as a duplicate.
                    tracing::warn!(error = %e, "ack of a committed reply failed");
                }
            }
            Err(EngineError::NotFound(_)) => {
                let reason = format!("reply for unknown transaction {id}");
                self.dead_letter(incoming, &reason).await;
            }
            Err(e @ EngineError::MissingDefinition(_)) => {
                tracing::warn!(%id, error = %e, "reply left for a process that has the definition");
                // Later, off this batch's path: the broker keeps the reply meanwhile.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = incoming.ack.requeue().await;
                });
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "reply not committed; it will be redelivered");
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = incoming.ack.requeue().await;
                });
            }
        }
    }

    async fn dead_letter(&self, incoming: Incoming, reason: &str) {
        tracing::warn!(reason, "reply dead-lettered");
        self.stats.count_dead_letter();
        if let Err(e) = incoming.ack.reject(&incoming.body, reason).await {
            tracing::warn!(error = %e, "reject failed");
        }
    }
}
