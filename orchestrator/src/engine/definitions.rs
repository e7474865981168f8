//! Definitions in the store: recording those this process registers (a name and version is
//! one plan for good), registering documents at run time, and loading the documents other
//! processes registered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::retention::sleep_or_stop;
use super::{Engine, EngineError};
use crate::definition::{Definition, Source};
use crate::document;
use crate::store::StoredDefinition;

/// How often the documents other processes registered are looked for: a newer version
/// registered elsewhere is started here this long after at most (a start that names an
/// unknown definition or version looks at once).
pub const DEFINITIONS_INTERVAL: Duration = Duration::from_secs(2);

/// What [`Engine::register_document`] did.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The definition, as this process runs it now.
    pub definition: Definition,
    /// Whether it was new (`false`: the same document was registered before).
    pub created: bool,
}

impl Engine {
    /// Records every definition of the registry in the store, or finds it there already; a
    /// definition that differs from the one stored under its name and version is refused
    /// ([`crate::definition::DefinitionError::Changed`]): a process must not start with it.
    /// `run` does this first.
    pub async fn register_definitions(&self) -> Result<(), EngineError> {
        for def in self.registry.iter() {
            self.record(&def).await?;
        }
        Ok(())
    }

    /// Stores `def` unless its name and version are stored, and checks that what is stored
    /// under them is `def`. Returns whether it was stored before (by this call or not).
    async fn record(&self, def: &Definition) -> Result<bool, EngineError> {
        let document = match def.source() {
            Source::Code => None,
            Source::Document { document, .. } => Some((**document).clone()),
        };
        let ours = StoredDefinition {
            plan: (**def.plan()).clone(),
            document,
        };
        let registered = self.store.register_definition(&ours).await?;
        let stored = &registered.stored;
        def.check_stored(&stored.plan, stored.document.as_ref())?;
        Ok(!registered.inserted)
    }

    /// Registers a definition document (JSON, as [`document::parse`] reads it): compiled,
    /// stored (immutable under its name and version: the same document again is accepted,
    /// another one refused) and runnable here at once, its participants' queues declared.
    pub async fn register_document(&self, doc: &Value) -> Result<Registered, EngineError> {
        let def = document::compile(doc)?;
        let known = self.registry.get(def.name(), def.version());
        let stored_before = self.record(&def).await?;
        if let Some(known) = known {
            // Registered here before: the store has just confirmed it is this document.
            return Ok(Registered {
                definition: known,
                created: false,
            });
        }
        self.transport
            .declare(&def.participants())
            .await
            .map_err(EngineError::Transport)?;
        // Another request may have inserted it meanwhile: the same document, as the store said.
        let _ = self.registry.insert(def.clone());
        Ok(Registered {
            definition: def,
            created: !stored_before,
        })
    }

    /// Loads the stored documents (of definition `name` only, if given) this process does not
    /// have yet, declaring their participants' queues; returns how many it loaded. A stored
    /// document this version cannot compile is logged and left out. Without `name`, the
    /// documents are read only when the store counts another number of them than the last
    /// complete look found (one small query otherwise).
    pub async fn load_definitions(&self, name: Option<&str>) -> Result<usize, EngineError> {
        if name.is_some() {
            return self.load_stored(name).await;
        }
        let count = self.store.document_count().await?;
        if count == self.documents_seen.load(Ordering::Acquire) {
            return Ok(0);
        }
        let loaded = self.load_stored(None).await?;
        // Counted before reading: a document registered meanwhile is read at the next look.
        self.documents_seen.fetch_max(count, Ordering::AcqRel);
        Ok(loaded)
    }

    async fn load_stored(&self, name: Option<&str>) -> Result<usize, EngineError> {
        let mut loaded = 0;
        for stored in self.store.definitions(name).await? {
            let Some(doc) = &stored.document else {
                continue;
            };
            if self
                .registry
                .get(&stored.plan.name, stored.plan.version)
                .is_some()
            {
                continue;
            }
            let def = match document::compile(doc) {
                Ok(def) => def,
                Err(e) => {
                    tracing::warn!(definition = %stored.plan.name, version = stored.plan.version, error = %e, "a stored definition document does not compile");
                    continue;
                }
            };
            if let Err(e) = def.check_stored(&stored.plan, Some(doc)) {
                tracing::warn!(error = %e, "a stored definition document compiles to another plan");
                continue;
            }
            self.transport.declare(&def.participants()).await?;
            if self.registry.insert(def).is_ok() {
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The definition `name` at `version` (its newest version when `None`), loaded from the
    /// store when this process does not have it. For the newest version of a document, the
    /// store is asked whether another process registered a newer one (one small query).
    pub async fn find_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<Definition>, EngineError> {
        if let Some(def) = self.registry.find(name, version) {
            let newer = match (version, def.source()) {
                (None, Source::Document { .. }) => self
                    .store
                    .newest_document_version(name)
                    .await?
                    .is_some_and(|v| v > def.version()),
                _ => false,
            };
            if !newer {
                return Ok(Some(def));
            }
        }
        self.load_definitions(Some(name)).await?;
        Ok(self.registry.find(name, version))
    }

    /// Loads the documents other processes register, every [`DEFINITIONS_INTERVAL`], until
    /// `shutdown`. A failure is logged once, until a look succeeds again.
    pub(super) async fn definitions_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            sleep_or_stop(&shutdown, DEFINITIONS_INTERVAL).await;
            let looked = tokio::select! {
                _ = shutdown.cancelled() => return,
                looked = self.load_definitions(None) => looked,
            };
            match looked {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "loading the definitions registered elsewhere failed; \
                        trying again every {DEFINITIONS_INTERVAL:?}, quietly until it works");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "loading the definitions registered elsewhere failed again")
                }
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("loading the definitions registered elsewhere works again");
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::definition::Registry;
    use crate::engine::EngineConfig;
    use crate::machine::{Event, Input};
    use crate::store::MemoryStore;
    use crate::transport::MemoryTransport;
    use sagas_participant::protocol::{Operation, Outcome, PROTOCOL_VERSION, Reply};
    use serde_json::json;
    use uuid::Uuid;

    fn engine_on(store: Arc<MemoryStore>) -> Arc<Engine> {
        Engine::new(
            store,
            Arc::new(MemoryTransport::new()),
            Registry::new(),
            Arc::new(SystemClock),
            EngineConfig::default(),
        )
    }

    /// `pay` at `version`: `reserve`, then `charge` whose command says its version and carries
    /// the reservation's output.
    fn pay(version: u32) -> Value {
        json!({
            "name": "pay", "version": version,
            "steps": [
                {"name": "reserve", "participant": "stock", "command": {"v": version}},
                {"name": "charge", "participant": "bank",
                 "command": {"v": version, "id": {"$ref": "/outputs/reserve/id"}}}
            ]
        })
    }

    fn reserved(id: Uuid) -> Input {
        Input::Reply(Reply {
            protocol: PROTOCOL_VERSION,
            transaction_id: id,
            step: "reserve".to_owned(),
            operation: Operation::Action,
            attempt: 1,
            outcome: Outcome::Succeeded {
                output: json!({"id": "r-1"}),
            },
        })
    }

    async fn prepared(engine: &Engine, id: Uuid, step: usize) -> Vec<Value> {
        engine
            .events(id)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.event {
                Event::CommandPrepared { step: s, payload } if s == step => Some(payload),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_running_instance_computes_its_later_commands_from_the_version_it_started_with() {
        let store = Arc::new(MemoryStore::new());
        let one = engine_on(store.clone());
        one.register_document(&pay(1)).await.unwrap();
        let id = one.start("pay", json!({})).await.unwrap().id;
        // A newer version, registered while the instance runs, in this process and another.
        one.register_document(&pay(2)).await.unwrap();
        let other = engine_on(store.clone());
        other.load_definitions(None).await.unwrap();
        assert_eq!(other.registry().latest("pay").unwrap().version(), 2);

        other.deliver(id, reserved(id), None).await.unwrap();
        assert_eq!(
            prepared(&other, id, 1).await,
            vec![json!({"v": 1, "id": "r-1"})]
        );
        let newer = one.start("pay", json!({})).await.unwrap();
        assert_eq!(newer.plan.version, 2);
    }

    #[tokio::test]
    async fn a_reply_for_a_version_not_loaded_yet_is_left_until_it_is_then_handled_by_it() {
        let store = Arc::new(MemoryStore::new());
        let one = engine_on(store.clone());
        let other = engine_on(store.clone());
        one.register_document(&pay(1)).await.unwrap();
        let id = one.start("pay", json!({})).await.unwrap().id;

        let err = other.deliver(id, reserved(id), None).await.unwrap_err();
        assert!(matches!(err, EngineError::MissingDefinition(_)), "{err:?}");
        assert!(prepared(&other, id, 1).await.is_empty());
        assert_eq!(other.load_definitions(None).await.unwrap(), 1);
        other.deliver(id, reserved(id), None).await.unwrap();
        assert_eq!(
            prepared(&other, id, 1).await,
            vec![json!({"v": 1, "id": "r-1"})]
        );
    }

    #[tokio::test]
    async fn the_loader_reads_the_documents_again_only_when_one_was_registered_since() {
        let store = Arc::new(MemoryStore::new());
        let one = engine_on(store.clone());
        let other = engine_on(store.clone());
        assert_eq!(other.load_definitions(None).await.unwrap(), 0);
        one.register_document(&pay(1)).await.unwrap();
        one.register_document(&pay(2)).await.unwrap();
        assert_eq!(other.load_definitions(None).await.unwrap(), 2);
        assert_eq!(other.documents_seen.load(Ordering::Acquire), 2);
        assert_eq!(other.load_definitions(None).await.unwrap(), 0);
        one.register_document(&pay(3)).await.unwrap();
        assert_eq!(other.load_definitions(None).await.unwrap(), 1);
        assert_eq!(other.registry().latest("pay").unwrap().version(), 3);
    }

    #[tokio::test]
    async fn the_loader_ends_when_told_to() {
        let engine = engine_on(Arc::new(MemoryStore::new()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.definitions_loop(shutdown.clone()));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop ends when cancelled")
            .unwrap();
    }
}
