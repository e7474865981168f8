//! Definitions in the store: recording those this process registers (a name and version is
//! one plan for good), registering documents at run time, and loading the documents other
//! processes registered.

use std::sync::Arc;
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
    /// under them is `def`. Returns whether it was stored before.
    async fn record(&self, def: &Definition) -> Result<bool, EngineError> {
        let document = match def.source() {
            Source::Code => None,
            Source::Document { document, .. } => Some((**document).clone()),
        };
        let ours = StoredDefinition {
            plan: (**def.plan()).clone(),
            document,
        };
        let stored = self.store.register_definition(&ours).await?;
        def.check_stored(&stored.plan, stored.document.as_ref())?;
        Ok(stored != ours)
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
    /// document this version cannot compile is logged and left out.
    pub async fn load_definitions(&self, name: Option<&str>) -> Result<usize, EngineError> {
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
    /// `shutdown`.
    pub(super) async fn definitions_loop(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            sleep_or_stop(&shutdown, DEFINITIONS_INTERVAL).await;
            if let Err(e) = self.load_definitions(None).await {
                tracing::warn!(error = %e, "loading the definitions registered elsewhere failed");
            }
        }
    }
}
