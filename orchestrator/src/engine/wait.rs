//! Requests waiting for instances to settle (`?wait`).
//!
//! Waits are registered by instance id ([`Waiters`]): a settled transition wakes only the waits
//! on its own instance, and costs one hash lookup when nobody waits. A transition committed in
//! this process hands its instance to the waits it wakes ([`Committed`]), so that they answer
//! without reading it back. Transitions committed by
//! other processes are heard through the store's [`Settlements`] (PostgreSQL NOTIFY on a
//! listening connection of each process): this process announces the instances it settled, in
//! batches and after their commits, and wakes its waits on what it hears; while no other
//! process listens it announces nothing (it keeps what it settled for a moment, for a newcomer
//! it has not yet seen). A wait also reads
//! its instance again every [`EngineConfig::wait_recheck`](super::EngineConfig), for what a
//! lost announcement (a crash between commit and announcement) left unheard.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sagas_participant::amqp::{Backoff, Sessions, keep_serving};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::metric::Stats;
use super::{Engine, EngineError, Started, settled};
use crate::machine::{Instance, Time};
use crate::store::{Announcements, Settlements, StoreError, StoredInstance};

/// The registry is split in this many maps, each under its own lock, so that wakes and waits
/// on different instances seldom meet on one lock.
const SHARDS: usize = 16;

/// At most this many ids are announced by one statement.
const ANNOUNCE_BATCH: usize = 1024;

/// Whether other processes listen is looked up again when the last finding is this old and
/// there is something to announce.
const OTHERS_RECHECK: Duration = Duration::from_secs(1);

/// Ids settled while no other process listened are kept this long, and announced if one is
/// found listening meanwhile: a process whose listener connected after the last look would
/// otherwise miss them.
const HELD: Duration = Duration::from_secs(3);

/// An instance as a transition of this process committed it, handed to the waits it settled.
#[derive(Debug)]
pub(super) struct Committed {
    /// The instance after the transition.
    pub instance: Instance,
    /// The time the transition stored as the instance's `updated_at`.
    pub updated_at: Time,
}

/// What the channel of one instance's waits holds: the newest instance handed to them, if any.
type Handed = Option<Arc<Committed>>;

/// The waits registered now, by the id of the instance they wait for: one channel per id,
/// whatever the number of waits on it, removed when its last wait leaves.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    shards: [Mutex<HashMap<Uuid, watch::Sender<Handed>>>; SHARDS],
}

impl Waiters {
    fn shard(&self, id: Uuid) -> MutexGuard<'_, HashMap<Uuid, watch::Sender<Handed>>> {
        self.shards[(id.as_u128() % SHARDS as u128) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A wait on `id`: woken by every [`Waiters::wake`] of `id` from now on, even one that
    /// comes before it is awaited.
    pub fn register(&self, id: Uuid) -> Waiter<'_> {
        let woken = self
            .shard(id)
            .entry(id)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Waiter {
            id,
            woken: Some(woken),
            waiters: self,
        }
    }

    /// Wakes the waits on `id` to read it; false when there are none. What was handed to them
    /// before stays, for a wait that has not seen it yet.
    pub fn wake(&self, id: Uuid) -> bool {
        match self.shard(id).get(&id) {
            Some(waits) => {
                waits.send_modify(|_| ());
                true
            }
            None => false,
        }
    }

    /// Wakes the waits on `id` with the instance as a transition committed it (`committed` is
    /// called only when somebody waits); false when there are none.
    pub fn hand(&self, id: Uuid, committed: impl FnOnce() -> Committed) -> bool {
        match self.shard(id).get(&id) {
            Some(waits) => {
                waits.send_replace(Some(Arc::new(committed())));
                true
            }
            None => false,
        }
    }

    /// Wakes every wait, to read its instance again.
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for waits in shard.values() {
                waits.send_modify(|_| ());
            }
        }
    }

    /// How many instances are waited for.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// One registered wait; it leaves the registry when dropped (its request answered, timed out
/// or gone).
#[derive(Debug)]
pub(super) struct Waiter<'a> {
    id: Uuid,
    /// Always `Some` until dropped.
    woken: Option<watch::Receiver<Handed>>,
    waiters: &'a Waiters,
}

impl Waiter<'_> {
    /// Resolves at the first wake since the previous one returned (or since registering), with
    /// the newest instance handed to the waits on this id, if any.
    async fn woken(&mut self) -> Handed {
        // The sender stays registered while this receiver exists: never an error.
        if let Some(woken) = &mut self.woken
            && woken.changed().await.is_ok()
        {
            return woken.borrow_and_update().clone();
        }
        std::future::pending().await
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut shard = self.waiters.shard(self.id);
        // Under the shard's lock, so that no wait registers in between.
        drop(self.woken.take());
        if shard
            .get(&self.id)
            .is_some_and(|waits| waits.receiver_count() == 0)
        {
            shard.remove(&self.id);
        }
    }
}

/// A wait for one instance to settle, registered before anything that could settle it was
/// read or done; [`Wait::settled`] waits.
pub struct Wait<'a> {
    engine: &'a Engine,
    waiter: Waiter<'a>,
    /// False when the instance is known to be unsettled as committed: the first read is
    /// skipped.
    read_first: bool,
    /// The sequence number of the newest unsettled state this wait knows of, and the
    /// instance's `created_at`: an instance handed to the wait answers it when it is newer.
    seen: Option<(u64, Time)>,
}

impl Wait<'_> {
    /// The instance this wait is for.
    pub fn id(&self) -> Uuid {
        self.waiter.id
    }

    /// Waits until the instance is terminal or stuck, at most `wait` (less if the engine
    /// stops), and returns it as it then is; `None` if there is no such instance.
    ///
    /// It reads the instance when the wait begins (unless it just started it), then only when
    /// woken: by a settled transition of this instance committed here (which hands the
    /// instance over: no read), announced by another process, by the listener's reconnection,
    /// or every [`EngineConfig::wait_recheck`](super::EngineConfig).
    pub async fn settled(mut self, wait: Duration) -> Result<Option<StoredInstance>, EngineError> {
        let engine = self.engine;
        let until = tokio::time::Instant::now() + wait;
        let mut read = self.read_first;
        let mut last = None;
        loop {
            if read {
                let stored = engine.read_waited(self.id()).await?;
                match &stored {
                    Some(s) if !settled(s.instance.status) => {
                        self.seen = Some((s.instance.seq, s.created_at));
                        last = Some(stored);
                    }
                    _ => return Ok(stored),
                }
            }
            let handed = tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = engine.stopping.cancelled() => break,
                _ = tokio::time::sleep(engine.config.wait_recheck) => None,
                handed = self.waiter.woken() => handed,
            };
            if let Some(answer) = self.answer(handed.as_deref()) {
                return Ok(Some(answer));
            }
            read = true;
        }
        match last {
            Some(stored) => Ok(stored),
            // Never read (it was not settled when it started): as it is now.
            None => engine.read_waited(self.id()).await,
        }
    }
}

impl Wait<'_> {
    /// The instance handed over, as stored, when it answers this wait: settled, and newer than
    /// what the wait saw unsettled (an older one was handed to waits before this one began).
    fn answer(&self, handed: Option<&Committed>) -> Option<StoredInstance> {
        let (seq, created_at) = self.seen?;
        let committed = handed?;
        (committed.instance.seq > seq && settled(committed.instance.status)).then(|| {
            self.engine.stats.count_wait_handed();
            StoredInstance {
                instance: committed.instance.clone(),
                created_at,
                updated_at: committed.updated_at,
            }
        })
    }
}

impl Engine {
    /// Waits until the instance is terminal or stuck (nothing more happens to it without an
    /// operator), at most `wait` (less if the engine stops), and returns it as it then is;
    /// `None` if there is no such instance. See [`Wait::settled`].
    pub async fn wait_terminal(
        &self,
        id: Uuid,
        wait: Duration,
    ) -> Result<Option<StoredInstance>, EngineError> {
        self.wait_for(id).settled(wait).await
    }

    /// A wait on `id`, registered now: what settles it from now on is not missed.
    pub fn wait_for(&self, id: Uuid) -> Wait<'_> {
        Wait {
            engine: self,
            waiter: self.waiters.register(id),
            read_first: true,
            seen: None,
        }
    }

    /// Starts like [`Engine::start_with`], with a wait on the instance it answers. The wait
    /// is registered before the start commits, and a start just committed unsettled is not
    /// read back.
    pub async fn start_waiting(
        &self,
        definition: &str,
        input: serde_json::Value,
        options: super::StartOptions,
    ) -> Result<(Started, Wait<'_>), EngineError> {
        let prepared = self.prepare_start(definition, input, options)?;
        let mut wait = self.wait_for(prepared.id());
        let started = self.commit_start(prepared).await?;
        if started.created {
            wait.read_first = settled(started.instance.status);
            wait.seen = Some((started.instance.seq, started.created_at));
        } else {
            // An idempotent repeat answers the first instance (read from the store).
            drop(wait);
            wait = self.wait_for(started.instance.id);
        }
        Ok((started, wait))
    }

    /// How many instances requests are waiting for now.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Reads an instance for a wait (counted once done: the cost of waits).
    async fn read_waited(&self, id: Uuid) -> Result<Option<StoredInstance>, EngineError> {
        let stored = self.store.get(id).await;
        self.stats.count_wait_read();
        Ok(stored?)
    }

    /// Wakes the waits on an instance whose committed transition settled it, here (handing
    /// them the instance) and, through the announcer, in the other processes.
    pub(super) fn settled_here(&self, instance: &Instance, updated_at: Time) {
        self.waiters.hand(instance.id, || Committed {
            instance: instance.clone(),
            updated_at,
        });
        if let Some(announcer) = &self.announcer {
            let _ = announcer.send(instance.id);
        }
    }

    /// Hears the other processes' settled instances until `shutdown`, reconnecting with
    /// backoff; nothing without [`Settlements`] or with them turned off.
    pub(super) async fn listen_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(settlements) = self.settlements.clone() else {
            return;
        };
        let stop = std::pin::pin!(shutdown.cancelled());
        let mut listening = Listening {
            engine: self,
            settlements,
        };
        keep_serving(
            "settlement listener",
            Backoff::default(),
            stop,
            &mut listening,
        )
        .await;
    }
}

/// The announcer of this process's settled instances, spawned on the current Tokio runtime
/// (none outside one, or without `settlements`).
pub(super) fn announcer(
    settlements: Option<Arc<dyn Settlements>>,
    stats: Arc<Stats>,
) -> Option<mpsc::UnboundedSender<Uuid>> {
    let settlements = settlements?;
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (tx, rx) = mpsc::unbounded_channel();
    runtime.spawn(announce_loop(settlements, stats, rx));
    Some(tx)
}

/// Announces settled instances off the path of their commits: the ids waiting when the
/// previous announcement is done go together (at most [`ANNOUNCE_BATCH`], never waiting for
/// more), so a quiet engine announces each at once and a busy one many per statement. A
/// failed announcement is not repeated: waits in other processes find those instances at
/// their next re-read.
///
/// Announcements are for other processes only: while none listens (looked up at most every
/// [`OTHERS_RECHECK`] while there is something to say) the ids are held for [`HELD`] instead,
/// and announced if a listener appears meanwhile, since it may have connected after the last
/// look. A failed look counts as "others listen".
async fn announce_loop(
    settlements: Arc<dyn Settlements>,
    stats: Arc<Stats>,
    mut rx: mpsc::UnboundedReceiver<Uuid>,
) {
    let mut ids = Vec::with_capacity(ANNOUNCE_BATCH);
    let mut held: VecDeque<(Instant, Uuid)> = VecDeque::new();
    // Whether others listen, and when that was looked up.
    let mut finding: Option<(bool, Instant)> = None;
    loop {
        let look_again = finding.map_or_else(Instant::now, |(_, at)| at + OTHERS_RECHECK);
        tokio::select! {
            n = rx.recv_many(&mut ids, ANNOUNCE_BATCH) => if n == 0 { break },
            _ = tokio::time::sleep_until(look_again), if !held.is_empty() => {}
        }
        let now = Instant::now();
        let others = match finding {
            Some((others, at)) if now < at + OTHERS_RECHECK => others,
            _ => {
                let others = settlements.others_listening().await.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "could not tell whether other processes listen; announcing");
                    true
                });
                finding = Some((others, now));
                others
            }
        };
        while held
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > HELD)
        {
            held.pop_front();
        }
        if !others {
            held.extend(ids.drain(..).map(|id| (now, id)));
            continue;
        }
        ids.extend(held.drain(..).map(|(_, id)| id));
        if ids.is_empty() {
            continue;
        }
        match settlements.announce(&ids).await {
            Ok(()) => stats.count_announced(ids.len()),
            Err(e) => {
                tracing::warn!(error = %e, ids = ids.len(), "settled transactions not announced; waits in other processes see them at their next re-read")
            }
        }
        ids.clear();
    }
}

/// The sessions of the listener, each on a connection of its own.
struct Listening {
    engine: Arc<Engine>,
    settlements: Arc<dyn Settlements>,
}

impl<S: Future<Output = ()>> Sessions<S> for Listening {
    type Connection = Box<dyn Announcements>;
    type Error = StoreError;

    async fn connect(&mut self) -> Result<Box<dyn Announcements>, StoreError> {
        self.settlements.listen().await
    }

    /// Ends (`Ok`) only at shutdown.
    async fn serve(
        &mut self,
        mut heard: Box<dyn Announcements>,
        mut shutdown: Pin<&mut S>,
    ) -> Result<(), StoreError> {
        // What was announced while no connection listened is lost: every wait reads again.
        self.engine.stats.count_listener_connect();
        self.engine.waiters.wake_all();
        loop {
            let ids = tokio::select! {
                () = shutdown.as_mut() => return Ok(()),
                ids = heard.next() => ids?,
            };
            for id in ids {
                self.engine.waiters.wake(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(waiter: &Waiter<'_>) -> bool {
        waiter
            .woken
            .as_ref()
            .is_some_and(|w| w.has_changed().unwrap_or(false))
    }

    #[test]
    fn a_wake_reaches_only_the_waits_on_its_instance() {
        let waiters = Waiters::default();
        let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
        let waits: Vec<Waiter<'_>> = ids.iter().map(|id| waiters.register(*id)).collect();
        let twice = waiters.register(ids[7]);
        assert_eq!(waiters.len(), 100);

        assert!(waiters.wake(ids[7]));
        let woken_ids: Vec<Uuid> = waits.iter().filter(|w| woken(w)).map(|w| w.id).collect();
        assert_eq!(woken_ids, [ids[7]]);
        assert!(woken(&twice));
        // Nobody waits for it: nothing to wake.
        assert!(!waiters.wake(Uuid::now_v7()));
    }

    #[test]
    fn a_wait_leaves_the_registry_with_the_last_wait_on_its_instance() {
        let waiters = Waiters::default();
        let id = Uuid::now_v7();
        let first = waiters.register(id);
        let second = waiters.register(id);
        drop(first);
        assert_eq!(waiters.len(), 1);
        assert!(waiters.wake(id));
        assert!(woken(&second));
        drop(second);
        assert_eq!(waiters.len(), 0);
        assert!(!waiters.wake(id));
    }

    #[test]
    fn an_instance_handed_to_waits_stays_when_others_wake_them_and_only_they_get_it() {
        let waiters = Waiters::default();
        let id = Uuid::now_v7();
        let waiter = waiters.register(id);
        // Nobody waits for the other one: nothing is built for it.
        assert!(!waiters.hand(Uuid::now_v7(), || unreachable!("nobody waits")));
        let committed = || Committed {
            instance: sample_instance(id, 7),
            updated_at: chrono::Utc::now(),
        };
        assert!(waiters.hand(id, committed));
        // A wake by an announcement keeps what was handed.
        assert!(waiters.wake(id));
        waiters.wake_all();
        let handed = waiter.woken.as_ref().unwrap().borrow().clone();
        assert_eq!(handed.map(|c| c.instance.seq), Some(7));
    }

    fn sample_instance(id: Uuid, seq: u64) -> Instance {
        let plan = crate::definition::Plan {
            name: "t".into(),
            version: 1,
            mode: crate::definition::Mode::Saga,
            steps: Vec::new(),
        };
        let mut instance: Instance = serde_json::from_value(serde_json::json!({
            "id": id, "plan": plan, "input": null, "status": "completed", "phase": "forward",
            "steps": [], "failure": null, "seq": seq,
        }))
        .expect("an instance");
        instance.seq = seq;
        instance
    }

    /// Settlements that record what is announced, with others listening or not as told.
    #[derive(Default)]
    struct Told {
        others: std::sync::atomic::AtomicBool,
        looks: std::sync::atomic::AtomicUsize,
        announced: Mutex<Vec<Uuid>>,
    }

    #[async_trait::async_trait]
    impl Settlements for Told {
        async fn announce(&self, ids: &[Uuid]) -> Result<(), StoreError> {
            self.announced.lock().unwrap().extend_from_slice(ids);
            Ok(())
        }
        async fn listen(&self) -> Result<Box<dyn Announcements>, StoreError> {
            Err(StoreError::Corrupt("not in this test".into()))
        }
        async fn others_listening(&self) -> Result<bool, StoreError> {
            self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.others.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    impl Told {
        fn announced(&self) -> Vec<Uuid> {
            self.announced.lock().unwrap().clone()
        }
        fn set_others(&self, others: bool) {
            self.others
                .store(others, std::sync::atomic::Ordering::SeqCst);
        }
        fn looks(&self) -> usize {
            self.looks.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_announced_while_no_other_process_listens_and_a_newcomer_hears_what_settled_just_before()
     {
        let told = Arc::new(Told::default());
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(announce_loop(told.clone(), stats.clone(), rx));
        let moment = Duration::from_millis(10);
        let [a, b, c, d] = [(); 4].map(|()| Uuid::now_v7());

        tx.send(a).unwrap();
        tokio::time::sleep(moment).await;
        assert_eq!((told.announced(), told.looks()), (vec![], 1));

        // A process starts listening: the held id reaches it at the next look.
        told.set_others(true);
        tokio::time::sleep(OTHERS_RECHECK).await;
        assert_eq!(told.announced(), [a]);
        tx.send(b).unwrap();
        tokio::time::sleep(moment).await;
        assert_eq!(told.announced(), [a, b]);
        assert_eq!(told.looks(), 2, "a fresh finding is not looked up again");

        // It leaves: what settles is held, then forgotten.
        told.set_others(false);
        tokio::time::sleep(OTHERS_RECHECK).await;
        tx.send(c).unwrap();
        tokio::time::sleep(HELD + OTHERS_RECHECK * 2).await;
        let looks = told.looks();
        tokio::time::sleep(OTHERS_RECHECK * 5).await;
        assert_eq!(told.looks(), looks, "nothing held, nothing to look for");
        told.set_others(true);
        tx.send(d).unwrap();
        tokio::time::sleep(moment).await;
        assert_eq!(told.announced(), [a, b, d]);
        assert_eq!(
            stats.announced.load(std::sync::atomic::Ordering::Relaxed),
            3
        );

        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop ends with its channel")
            .unwrap();
    }

    #[tokio::test]
    async fn a_wake_between_registering_and_awaiting_is_not_missed() {
        let waiters = Waiters::default();
        let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut waiter = waiters.register(id);
        waiters.wake(id);
        tokio::time::timeout(Duration::from_secs(10), waiter.woken())
            .await
            .expect("the wake before the await counts");
        // Once seen, it does not wake again.
        let mut again = std::pin::pin!(waiter.woken());
        assert!(futures_util::poll!(again.as_mut()).is_pending());
        // A wake of everyone reaches it.
        let other = waiters.register(other);
        waiters.wake_all();
        assert!(futures_util::poll!(again.as_mut()).is_ready());
        assert!(woken(&other));
    }
}
