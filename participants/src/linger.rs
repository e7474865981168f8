//! How long a batch waits for more: the one rule of every batching loop, the orchestrator's
//! (starts, replies) and a participant's (commands).
//!
//! A batch takes what is waiting when it begins. Under load that alone makes batches grow
//! (while one commits, the next gathers); at a moderate load each batch is small and its
//! fixed costs (a commit, a message, the wake-ups of every process on the way) are paid
//! nearly once per item. A [`Linger`] lets a batch wait a short window for more, **only after
//! a batch that held more than one item**: a lone saga's batches hold one item each, so it
//! never waits; PostgreSQL's `commit_delay` is bounded by `commit_siblings` for the same
//! reason. A batch that holds [`ENOUGH`] stops waiting (it still takes what is waiting, up to
//! its limit): at the peak, where batches are that large anyway, nothing waits
//! (docs/architecture.md, "Batches that wait").

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// The window the orchestrator's batches wait for more by default. With [`ENOUGH`], against
/// 2 ms without it: at a paced load a quarter less CPU per saga and a lower p50 and p99, at
/// the peak as many sagas/s or more (docs/performance.md, "Batches of enough").
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);

/// A batch that holds this many items stops waiting for more: enough to spread a commit and
/// a message over. At a moderate load batches rarely reach it and wait out the window; at the
/// peak they reach it at once, and a closed loop of clients does not wait at every batching
/// point (5 ms without this bound cost the peak 1–6 % of its sagas/s).
pub const ENOUGH: usize = 16;

/// Whether a batch that holds `held` items may still wait for more (it holds fewer than
/// [`ENOUGH`]).
fn wants_more(held: usize) -> bool {
    held < ENOUGH
}

/// A participant's default: none. Its commands already come in batches that the
/// orchestrator's linger filled; waiting for a second one saved 0–3 % of CPU per saga and cost
/// 2–18 ms of p50 (docs/performance.md, "Batches that wait"). It pays where commands come one
/// by one (`SAGAS_AMQP_COMMAND_BATCH=1`, a participant that announces no batches).
pub const DEFAULT_PARTICIPANT_LINGER: Duration = Duration::ZERO;

/// The longest window the configuration accepts: a batch held longer would cost a saga more
/// than the commits it saves.
pub const MAX_LINGER: Duration = Duration::from_millis(100);

/// Whether, and until when, the batch being gathered waits for more items.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    window: Duration,
    /// Whether the last batch held more than one item.
    plural: bool,
}

impl Linger {
    /// Batches that wait up to `window` after a batch of more than one item (zero: never).
    pub fn new(window: Duration) -> Linger {
        Linger {
            window,
            plural: false,
        }
    }

    /// Until when the batch that begins now may wait for more: `None` after a batch of one
    /// (there was nothing to batch), or when the window is zero.
    pub fn until(&self) -> Option<Instant> {
        (self.plural && !self.window.is_zero()).then(|| Instant::now() + self.window)
    }

    /// Takes in whether the batch just gathered held more than one item.
    pub fn gathered(&mut self, plural: bool) {
        self.plural = plural;
    }

    /// Fills `batch` (which holds its first item) from `source` up to `limit`: with what is
    /// waiting and, when [`Linger::until`] allows and while it holds fewer than [`ENOUGH`],
    /// with what arrives until then.
    pub async fn fill<T, S: Source<T>>(
        &mut self,
        batch: &mut Vec<T>,
        limit: usize,
        source: &mut S,
    ) {
        let until = self.until();
        while batch.len() < limit {
            // A waiting item is taken at once either way (a timeout polls its future first);
            // the end of the window or of the source ends the batch (the source's end is seen
            // again by the next receive).
            let next = match until.filter(|_| wants_more(batch.len())) {
                None => source.ready(),
                Some(until) => tokio::time::timeout_at(until, source.next())
                    .await
                    .ok()
                    .flatten(),
            };
            match next {
                Some(item) => batch.push(item),
                None => break,
            }
        }
        self.gathered(batch.len() > 1);
    }
}

/// Where a batch's items come from: a channel's receiving end.
pub trait Source<T> {
    /// An item already waiting, without waiting.
    fn ready(&mut self) -> Option<T>;
    /// The next item; `None` once the source has ended.
    fn next(&mut self) -> impl Future<Output = Option<T>> + Send;
}

impl<T: Send> Source<T> for mpsc::Receiver<T> {
    fn ready(&mut self) -> Option<T> {
        self.try_recv().ok()
    }

    fn next(&mut self) -> impl Future<Output = Option<T>> + Send {
        self.recv()
    }
}

impl<T: Send> Source<T> for mpsc::UnboundedReceiver<T> {
    fn ready(&mut self) -> Option<T> {
        self.try_recv().ok()
    }

    fn next(&mut self) -> impl Future<Output = Option<T>> + Send {
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(2);

    /// The batch that begins with item 1 (up to 16) and how long it took to gather.
    async fn gather<S: Source<u32>>(linger: &mut Linger, source: &mut S) -> (Vec<u32>, Duration) {
        let begun = Instant::now();
        let mut batch = vec![1];
        linger.fill(&mut batch, 16, source).await;
        (batch, Instant::now() - begun)
    }

    /// A linger of `window` after a batch of several.
    fn after_several(window: Duration) -> Linger {
        let mut linger = Linger::new(window);
        linger.gathered(true);
        linger
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_after_a_lone_item_takes_what_waits_and_does_not_wait() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut linger = Linger::new(WINDOW);
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = later.send(3);
        });
        tx.send(2).unwrap();
        let (batch, took) = gather(&mut linger, &mut rx).await;
        assert_eq!(batch, vec![1, 2], "what waited, nothing that came later");
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_after_a_plural_one_waits_out_its_window_for_more() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut linger = after_several(WINDOW);
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = later.send(2);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = later.send(3);
        });
        let (batch, took) = gather(&mut linger, &mut rx).await;
        assert_eq!(batch, vec![1, 2], "what came within the window, not after");
        assert_eq!(took, WINDOW);
        assert!(
            linger.until().is_some(),
            "the batch held two: the next one waits too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_stops_waiting_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut linger = after_several(WINDOW);
        for n in 2..=5 {
            tx.send(n).await.unwrap();
        }
        let begun = Instant::now();
        let mut batch = vec![1];
        linger.fill(&mut batch, 3, &mut rx).await;
        assert_eq!(batch, vec![1, 2, 3]);
        assert_eq!(Instant::now(), begun);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_enough_stops_waiting_but_takes_what_waits() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut linger = after_several(WINDOW);
        let items = ENOUGH as u32 + 2;
        for n in 2..=items {
            tx.send(n).unwrap();
        }
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = later.send(0);
        });
        let begun = Instant::now();
        let mut batch = vec![1];
        linger.fill(&mut batch, 64, &mut rx).await;
        assert_eq!(
            batch,
            (1..=items).collect::<Vec<_>>(),
            "all that waited, nothing later"
        );
        assert_eq!(Instant::now(), begun);
        assert!(!wants_more(ENOUGH) && wants_more(ENOUGH - 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_after_waiting_ends_the_waiting() {
        let (_tx, mut rx) = mpsc::channel::<u32>(8);
        let mut linger = after_several(WINDOW);
        let (batch, took) = gather(&mut linger, &mut rx).await;
        assert_eq!((batch, took), (vec![1], WINDOW));
        assert!(
            linger.until().is_none(),
            "nothing came: the next batch goes at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_window_never_waits() {
        let (_tx, mut rx) = mpsc::channel::<u32>(8);
        let mut linger = after_several(Duration::ZERO);
        assert!(linger.until().is_none());
        let (batch, took) = gather(&mut linger, &mut rx).await;
        assert_eq!((batch, took), (vec![1], Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_ends_while_waiting_ends_the_batch() {
        let (tx, mut rx) = mpsc::channel::<u32>(8);
        let mut linger = after_several(WINDOW);
        tx.send(2).await.unwrap();
        drop(tx);
        let (batch, took) = gather(&mut linger, &mut rx).await;
        assert_eq!(batch, vec![1, 2]);
        assert_eq!(took, Duration::ZERO, "an ended source is not waited for");
    }
}
