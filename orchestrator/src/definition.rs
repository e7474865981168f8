//! Saga and TCC definitions: the Rust builder API, the serializable plan that is logged with
//! every instance, and the registry of definitions by name and version.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// How a transaction coordinates its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Steps run forward in order (`action`); on failure, those that ran are compensated in reverse.
    Saga,
    /// Every step is tried at once (`try`); then all are confirmed, or all that may have been
    /// tried are cancelled.
    Tcc,
}

impl Mode {
    /// The wire/database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Saga => "saga",
            Mode::Tcc => "tcc",
        }
    }
}

/// Retry policy of one operation: exponential backoff with jitter, bounded by attempts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, including the first one (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff_ms: u64,
    /// Upper bound of any delay.
    pub max_backoff_ms: u64,
    /// Growth factor of the delay per attempt.
    pub multiplier: f64,
    /// Fraction (0..=1) of each delay that is randomized away, so retries spread out.
    pub jitter: f64,
}

impl RetryPolicy {
    /// The default for forward operations (`action`, `try`): 3 attempts, 200 ms doubling to 5 s.
    pub const FORWARD: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 200,
        max_backoff_ms: 5_000,
        multiplier: 2.0,
        jitter: 0.2,
    };

    /// The default for compensate/confirm/cancel: 20 attempts, 500 ms doubling to 60 s
    /// (about 15 minutes in all) before the instance is reported `stuck`.
    pub const FINISH: RetryPolicy = RetryPolicy {
        max_attempts: 20,
        initial_backoff_ms: 500,
        max_backoff_ms: 60_000,
        multiplier: 2.0,
        jitter: 0.2,
    };

    /// A policy with `max_attempts` attempts and the given first and largest delays.
    pub fn exponential(max_attempts: u32, initial: Duration, max: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff_ms: initial.as_millis() as u64,
            max_backoff_ms: max.as_millis() as u64,
            ..RetryPolicy::FORWARD
        }
    }

    /// The same policy with another jitter fraction.
    pub fn with_jitter(self, jitter: f64) -> RetryPolicy {
        RetryPolicy { jitter, ..self }
    }

    /// The delay after `attempts` failed attempts (1 = after the first one), before jitter.
    pub fn base_delay_ms(&self, attempts: u32) -> u64 {
        let exp = attempts.saturating_sub(1).min(64) as i32;
        let raw = self.initial_backoff_ms as f64 * self.multiplier.max(1.0).powi(exp);
        raw.min(self.max_backoff_ms as f64).max(0.0) as u64
    }

    /// The delay after `attempts` failed attempts, with `unit` in `[0, 1)` choosing the jitter.
    pub fn delay_ms(&self, attempts: u32, unit: f64) -> u64 {
        let base = self.base_delay_ms(attempts) as f64;
        let jitter = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        (base * (1.0 - jitter)).round() as u64
    }

    /// The policy as the store gives it back: PostgreSQL's jsonb reads -0.0 as 0.0, so a plan
    /// with -0.0 would not have the same fingerprint once stored.
    fn stored_form(self) -> RetryPolicy {
        RetryPolicy {
            multiplier: self.multiplier + 0.0,
            jitter: self.jitter + 0.0,
            ..self
        }
    }

    pub(crate) fn validate(&self, what: &str) -> Result<(), DefinitionError> {
        if self.max_attempts == 0 {
            return Err(DefinitionError::Invalid(format!(
                "{what}: max_attempts must be at least 1"
            )));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(DefinitionError::Invalid(format!(
                "{what}: multiplier must be a finite number >= 1"
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(DefinitionError::Invalid(format!(
                "{what}: jitter must be between 0 and 1"
            )));
        }
        Ok(())
    }
}

/// The static shape of one step, logged with each instance so that recovery after a redeploy
/// uses what the instance started with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Step name, unique within the definition.
    pub name: String,
    /// The participant (AMQP routing key) that executes the step.
    pub participant: String,
    /// Retry policy of the forward operation (`action` / `try`).
    pub retry: RetryPolicy,
    /// Retry policy of `compensate` / `confirm` / `cancel`; past it the instance is `stuck`.
    pub finish_retry: RetryPolicy,
    /// How long one attempt waits for its reply.
    pub timeout_ms: u64,
    /// How long an attempt the participant answered `in_progress` may take before it counts as
    /// timed out.
    #[serde(default = "default_in_progress_ms")]
    pub in_progress_timeout_ms: u64,
    /// Indices of the steps this one runs after (saga only); `None` means the previous step,
    /// so that a plain list of steps runs in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<usize>>,
    /// The signal a wait step waits for (saga only): it sends no command and has no
    /// participant (`participant` is empty); the signal's data becomes its output, and
    /// `timeout_ms` is how long it waits. `None` for a step a participant executes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

impl StepPlan {
    /// True for a step that waits for a signal rather than sending a command.
    pub fn is_wait(&self) -> bool {
        self.signal.is_some()
    }
}

/// One hour: the default of [`StepPlan::in_progress_timeout_ms`].
pub const DEFAULT_IN_PROGRESS_MS: u64 = 3_600_000;

fn default_in_progress_ms() -> u64 {
    DEFAULT_IN_PROGRESS_MS
}

/// The static shape of a definition: what an instance needs to run without the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Definition name.
    pub name: String,
    /// Definition version.
    pub version: u32,
    /// Saga or TCC.
    pub mode: Mode,
    /// Ordered steps.
    pub steps: Vec<StepPlan>,
}

/// A field of a retry policy, as a message shows it.
type PolicyField = fn(&RetryPolicy) -> String;

/// The namespace of plan fingerprints: a plan's fingerprint is the version 5 UUID of its JSON
/// in it.
const PLAN_NAMESPACE: Uuid = Uuid::from_u128(0x66177c7f_49e1_4cbc_8d6b_914891c5e4c3);

impl Plan {
    /// The plan's fingerprint: the same for equal plans, in every process (a version 5 UUID
    /// of its JSON). It is also the plan's id in the PostgreSQL store (`sagas_plans`).
    pub fn fingerprint(&self) -> Uuid {
        let json = serde_json::to_vec(self).expect("a plan serializes");
        Uuid::new_v5(&PLAN_NAMESPACE, &json)
    }

    /// What differs between `self` and `other` (another plan of the same name and version),
    /// one phrase each, for a message: `step `credit` participant changed from "a" to "b"`.
    pub fn differences(&self, other: &Plan) -> Vec<String> {
        let mut found = Vec::new();
        if self.mode != other.mode {
            found.push(format!(
                "mode changed from {} to {}",
                self.mode.as_str(),
                other.mode.as_str()
            ));
        }
        let names = |p: &Plan| p.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if names(self) != names(other) {
            found.push(format!(
                "steps changed from [{}] to [{}]",
                names(self).join(", "),
                names(other).join(", ")
            ));
        }
        for (i, (a, b)) in self.steps.iter().zip(&other.steps).enumerate() {
            if a.name != b.name {
                continue;
            }
            let mut changed = |what: &str, from: String, to: String| {
                if from != to {
                    found.push(format!(
                        "step `{}` {what} changed from {from} to {to}",
                        a.name
                    ));
                }
            };
            changed(
                "participant",
                format!("{:?}", a.participant),
                format!("{:?}", b.participant),
            );
            let fields: [(&str, PolicyField); 5] = [
                ("max_attempts", |p| p.max_attempts.to_string()),
                ("initial_backoff_ms", |p| p.initial_backoff_ms.to_string()),
                ("max_backoff_ms", |p| p.max_backoff_ms.to_string()),
                ("multiplier", |p| p.multiplier.to_string()),
                ("jitter", |p| p.jitter.to_string()),
            ];
            for (policy, x, y) in [
                ("retry", &a.retry, &b.retry),
                ("finish_retry", &a.finish_retry, &b.finish_retry),
            ] {
                for (field, value) in fields {
                    changed(&format!("{policy}.{field}"), value(x), value(y));
                }
            }
            changed(
                "timeout_ms",
                a.timeout_ms.to_string(),
                b.timeout_ms.to_string(),
            );
            changed(
                "in_progress_timeout_ms",
                a.in_progress_timeout_ms.to_string(),
                b.in_progress_timeout_ms.to_string(),
            );
            let after = |p: &Plan| {
                let deps = p.deps(i);
                let deps: Vec<&str> = deps.iter().map(|&d| p.steps[d].name.as_str()).collect();
                format!("[{}]", deps.join(", "))
            };
            changed("after", after(self), after(other));
            changed(
                "signal",
                format!("{:?}", a.signal),
                format!("{:?}", b.signal),
            );
        }
        if found.is_empty() && self != other {
            found.push("the plan changed".to_owned());
        }
        found
    }

    /// The index of the step named `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The steps step `i` runs after.
    pub fn deps(&self, i: usize) -> Vec<usize> {
        match self.steps.get(i).and_then(|s| s.after.clone()) {
            Some(deps) => deps,
            None if i == 0 => Vec::new(),
            None => vec![i - 1],
        }
    }

    /// Every step that has succeeded before step `i` starts: its dependencies, theirs, and so
    /// on, in order.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.steps.len()];
        let mut todo = self.deps(i);
        while let Some(d) = todo.pop() {
            if let Some(false) = seen.get(d) {
                seen[d] = true;
                todo.extend(self.deps(d));
            }
        }
        (0..self.steps.len()).filter(|&j| seen[j]).collect()
    }

    /// The steps that run after step `i`.
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&j| self.deps(j).contains(&i))
            .collect()
    }
}

/// The outputs of the steps that have succeeded so far, by step name.
#[derive(Debug, Clone, Copy)]
pub struct Outputs<'a> {
    names: &'a [StepPlan],
    values: &'a [Option<Value>],
}

impl<'a> Outputs<'a> {
    /// Outputs of `names[i]` given by `values[i]`.
    pub fn new(names: &'a [StepPlan], values: &'a [Option<Value>]) -> Outputs<'a> {
        Outputs { names, values }
    }

    /// The output of the step named `step`, if it has succeeded.
    pub fn get(&self, step: &str) -> Option<&'a Value> {
        let i = self.names.iter().position(|s| s.name == step)?;
        self.values.get(i)?.as_ref()
    }

    /// The output of `step` deserialized into `T`.
    pub fn get_as<T: DeserializeOwned>(&self, step: &str) -> Result<T, String> {
        let v = self
            .get(step)
            .ok_or_else(|| format!("step {step} has no output"))?;
        serde_json::from_value(v.clone()).map_err(|e| format!("output of step {step}: {e}"))
    }
}

type CommandFn<I> = Arc<dyn Fn(&I, &Outputs<'_>) -> Result<Value, String> + Send + Sync>;
pub(crate) type ErasedCommandFn =
    Arc<dyn Fn(&Value, &Outputs<'_>) -> Result<Value, String> + Send + Sync>;
type ValidateFn = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// One step of a definition under construction, for input type `I`.
pub struct Step<I> {
    plan: StepPlan,
    command: Option<CommandFn<I>>,
    after: Option<Vec<String>>,
}

impl<I> Step<I> {
    /// A step named `name` executed by `participant`, with default retry policies and a 10 s timeout.
    pub fn new(name: impl Into<String>, participant: impl Into<String>) -> Step<I> {
        Step {
            plan: StepPlan {
                name: name.into(),
                participant: participant.into(),
                retry: RetryPolicy::FORWARD,
                finish_retry: RetryPolicy::FINISH,
                timeout_ms: 10_000,
                in_progress_timeout_ms: DEFAULT_IN_PROGRESS_MS,
                after: None,
                signal: None,
            },
            command: None,
            after: None,
        }
    }

    /// A step named `name` that waits for the signal `signal` (10 s unless
    /// [`Step::timeout`] says otherwise): no participant, no command; the signal's data is
    /// its output, and it has nothing to compensate.
    pub fn wait(name: impl Into<String>, signal: impl Into<String>) -> Step<I> {
        let mut step = Step::new(name, "");
        step.plan.signal = Some(signal.into());
        step.command = Some(Arc::new(|_, _| Ok(Value::Null)));
        step
    }

    /// How the step's command payload is computed from the input and earlier outputs.
    pub fn command(
        mut self,
        f: impl Fn(&I, &Outputs<'_>) -> Value + Send + Sync + 'static,
    ) -> Step<I> {
        self.command = Some(Arc::new(move |i, o| Ok(f(i, o))));
        self
    }

    /// Like [`Step::command`], for computations that can fail (the step then fails for good).
    pub fn try_command(
        mut self,
        f: impl Fn(&I, &Outputs<'_>) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Step<I> {
        self.command = Some(Arc::new(f));
        self
    }

    /// Retry policy of the forward operation.
    pub fn retry(mut self, policy: RetryPolicy) -> Step<I> {
        self.plan.retry = policy.stored_form();
        self
    }

    /// Retry policy of compensate/confirm/cancel.
    pub fn finish_retry(mut self, policy: RetryPolicy) -> Step<I> {
        self.plan.finish_retry = policy.stored_form();
        self
    }

    /// How long each attempt waits for a reply (for a wait step: how long it waits for its
    /// signal before it fails).
    pub fn timeout(mut self, timeout: Duration) -> Step<I> {
        self.plan.timeout_ms = timeout.as_millis().max(1) as u64;
        self
    }

    /// Runs this saga step once all of `steps` (earlier steps, by name) have succeeded, instead
    /// of after the previous step; steps whose dependencies are met run in parallel, and
    /// compensation follows the reverse of the dependency order. `after([])` starts at once.
    pub fn after<S: Into<String>>(mut self, steps: impl IntoIterator<Item = S>) -> Step<I> {
        self.after = Some(steps.into_iter().map(Into::into).collect());
        self
    }

    /// How long an attempt answered `in_progress` may take (default one hour).
    pub fn in_progress_timeout(mut self, timeout: Duration) -> Step<I> {
        self.plan.in_progress_timeout_ms = timeout.as_millis().max(1) as u64;
        self
    }
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// The definition is malformed.
    #[error("invalid definition: {0}")]
    Invalid(String),
    /// A definition with the same name and version is registered already.
    #[error("definition {0} version {1} is registered already")]
    Duplicate(String, u32),
    /// The store holds another definition under this name and version: a changed definition
    /// needs a new version, so that running instances keep the one they started with.
    #[error(
        "definition {name} v{version} differs from the one registered: {}; bump the version",
        differences.join("; ")
    )]
    Changed {
        /// The definition's name.
        name: String,
        /// Its version.
        version: u32,
        /// What differs, one phrase each.
        differences: Vec<String>,
    },
}

/// Where a definition comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Rust code compiled into the process ([`DefinitionBuilder`]).
    Code,
    /// A document registered as data ([`crate::document`]).
    Document {
        /// The document, as JSON.
        document: Arc<Value>,
        /// Its content hash (`sha256:` and the hex digest of its canonical JSON).
        hash: String,
    },
}

/// Builder of a definition whose input is `I` (any JSON-deserializable type).
pub struct DefinitionBuilder<I> {
    name: String,
    version: u32,
    mode: Mode,
    steps: Vec<Step<I>>,
    check: Option<CheckFn<I>>,
    _input: PhantomData<fn() -> I>,
}

type CheckFn<I> = Arc<dyn Fn(&I) -> Result<(), String> + Send + Sync>;

/// A registered definition: the plan plus the code that computes forward commands.
#[derive(Clone)]
pub struct Definition {
    plan: Arc<Plan>,
    validate: ValidateFn,
    commands: Arc<[ErasedCommandFn]>,
    source: Source,
}

impl fmt::Debug for Definition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Definition")
            .field("plan", &self.plan)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Definition {
    /// Starts a saga definition.
    pub fn saga<I>(name: impl Into<String>, version: u32) -> DefinitionBuilder<I> {
        DefinitionBuilder::new(name, version, Mode::Saga)
    }

    /// Starts a TCC definition.
    pub fn tcc<I>(name: impl Into<String>, version: u32) -> DefinitionBuilder<I> {
        DefinitionBuilder::new(name, version, Mode::Tcc)
    }

    /// The plan logged with every instance.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// The definition name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// The definition version.
    pub fn version(&self) -> u32 {
        self.plan.version
    }

    /// The participants its steps name, sorted and deduplicated.
    pub fn participants(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .plan
            .steps
            .iter()
            .filter(|s| !s.is_wait())
            .map(|s| s.participant.clone())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Where the definition comes from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The same definition, from `source`.
    pub(crate) fn with_source(self, source: Source) -> Definition {
        Definition { source, ..self }
    }

    /// Checks that `plan` and `document`, stored under this definition's name and version,
    /// are this definition: the same plan, and the same document (or none for code).
    pub fn check_stored(
        &self,
        plan: &Plan,
        document: Option<&Value>,
    ) -> Result<(), DefinitionError> {
        let mut differences = plan.differences(&self.plan);
        match (&self.source, document) {
            (Source::Code, None) => {}
            (Source::Code, Some(_)) => {
                differences.push("it was registered as a document, this one is code".to_owned())
            }
            (Source::Document { .. }, None) => {
                differences.push("it was registered in code, this one is a document".to_owned())
            }
            (Source::Document { hash, .. }, Some(stored)) => {
                let was = crate::document::content_hash(stored);
                if was != *hash && differences.is_empty() {
                    differences.push(format!(
                        "the document changed (content hash {was}, now {hash})"
                    ));
                }
            }
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(DefinitionError::Changed {
            name: self.plan.name.clone(),
            version: self.plan.version,
            differences,
        })
    }

    /// Checks that `input` deserializes into the definition's input type.
    pub fn validate_input(&self, input: &Value) -> Result<(), String> {
        (self.validate)(input)
    }

    /// Computes the forward command of step `step`.
    pub fn command(
        &self,
        step: usize,
        input: &Value,
        outputs: &Outputs<'_>,
    ) -> Result<Value, String> {
        let f = self
            .commands
            .get(step)
            .ok_or_else(|| format!("definition has no step {step}"))?;
        f(input, outputs)
    }
}

impl<I> DefinitionBuilder<I> {
    fn new(name: impl Into<String>, version: u32, mode: Mode) -> Self {
        DefinitionBuilder {
            name: name.into(),
            version,
            mode,
            steps: Vec::new(),
            check: None,
            _input: PhantomData,
        }
    }

    /// Business rules the input must satisfy beyond its type (e.g. a positive amount). A start
    /// request that breaks them is refused before anything is stored.
    pub fn validate(
        mut self,
        check: impl Fn(&I) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    /// Appends a step named `name` executed by `participant`; `configure` sets its command
    /// (required) and optionally its retry policies and timeout.
    ///
    /// ```
    /// # use sagas_orchestrator::{Definition, RetryPolicy};
    /// # use std::time::Duration;
    /// #[derive(serde::Deserialize)]
    /// struct Order { qty: u32 }
    /// let def = Definition::saga::<Order>("order", 1)
    ///     .step("reserve", "inventory", |s| {
    ///         s.command(|o, _| serde_json::json!({ "qty": o.qty }))
    ///             .timeout(Duration::from_secs(5))
    ///             .retry(RetryPolicy::exponential(5, Duration::from_millis(100), Duration::from_secs(2)))
    ///     })
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(def.plan().steps[0].timeout_ms, 5000);
    /// ```
    pub fn step(
        mut self,
        name: impl Into<String>,
        participant: impl Into<String>,
        configure: impl FnOnce(Step<I>) -> Step<I>,
    ) -> Self {
        self.steps.push(configure(Step::new(name, participant)));
        self
    }

    /// Appends a step named `name` that waits for the signal `signal` (saga only), delivered
    /// by `POST /v1/sagas/{id}/signals/{signal}`; `configure` may set its timeout (default
    /// 10 s; past it the step fails and the saga compensates) and `after`. Its output is the
    /// signal's data, for later steps' commands.
    ///
    /// ```
    /// # use sagas_orchestrator::Definition;
    /// # use std::time::Duration;
    /// #[derive(serde::Deserialize)]
    /// struct Payment { amount: u64 }
    /// let def = Definition::saga::<Payment>("pay", 1)
    ///     .step("hold", "payment", |s| s.command(|p, _| serde_json::json!({ "amount": p.amount })))
    ///     .wait("authorize", "3ds", |s| s.timeout(Duration::from_secs(600)))
    ///     .step("capture", "payment", |s| {
    ///         s.command(|_, out| serde_json::json!({ "auth": out.get("authorize").cloned() }))
    ///     })
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(def.plan().steps[1].signal.as_deref(), Some("3ds"));
    /// ```
    pub fn wait(
        mut self,
        name: impl Into<String>,
        signal: impl Into<String>,
        configure: impl FnOnce(Step<I>) -> Step<I>,
    ) -> Self {
        self.steps.push(configure(Step::wait(name, signal)));
        self
    }
}

impl<I: DeserializeOwned + 'static> DefinitionBuilder<I> {
    /// Validates and finishes the definition.
    pub fn build(self) -> Result<Definition, DefinitionError> {
        valid_name("definition name", &self.name)?;
        if matches!(self.name.as_str(), "." | "..") {
            // A segment of the API's paths (`/v1/sagas/{name}`), which clients resolve away.
            return Err(DefinitionError::Invalid(format!(
                "definition name {:?} cannot be . or ..",
                self.name
            )));
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::Invalid(format!(
                "{} has no steps",
                self.name
            )));
        }
        let mut plans = Vec::with_capacity(self.steps.len());
        let mut commands: Vec<ErasedCommandFn> = Vec::with_capacity(self.steps.len());
        for mut step in self.steps {
            let what = format!("{} step {}", self.name, step.plan.name);
            if let Some(names) = step.after.take() {
                if self.mode == Mode::Tcc {
                    return Err(DefinitionError::Invalid(format!(
                        "{what}: TCC branches all run at once and take no `after`"
                    )));
                }
                let mut deps = Vec::with_capacity(names.len());
                for name in names {
                    let Some(i) = plans.iter().position(|p: &StepPlan| p.name == name) else {
                        return Err(DefinitionError::Invalid(format!(
                            "{what} runs after {name:?}, which is not an earlier step"
                        )));
                    };
                    if !deps.contains(&i) {
                        deps.push(i);
                    }
                }
                deps.sort_unstable();
                step.plan.after = Some(deps);
            }
            valid_name(&what, &step.plan.name)?;
            match &step.plan.signal {
                Some(signal) => {
                    if self.mode == Mode::Tcc {
                        return Err(DefinitionError::Invalid(format!(
                            "{what}: a TCC transaction cannot wait for a signal (its tries \
                             all run at once and a wait has nothing to confirm or cancel)"
                        )));
                    }
                    valid_name(&format!("{what} signal"), signal)?;
                    if plans
                        .iter()
                        .any(|p: &StepPlan| p.signal.as_ref() == Some(signal))
                    {
                        return Err(DefinitionError::Invalid(format!(
                            "{}: signal {signal} is waited for by two steps",
                            self.name
                        )));
                    }
                }
                None => valid_name(&format!("{what} participant"), &step.plan.participant)?,
            }
            if plans.iter().any(|p: &StepPlan| p.name == step.plan.name) {
                return Err(DefinitionError::Invalid(format!(
                    "{}: step name {} is used twice",
                    self.name, step.plan.name
                )));
            }
            step.plan.retry.validate(&what)?;
            step.plan.finish_retry.validate(&what)?;
            let Some(f) = step.command else {
                return Err(DefinitionError::Invalid(format!("{what} has no command")));
            };
            commands.push(Arc::new(move |input: &Value, outputs: &Outputs<'_>| {
                let typed: I = serde_json::from_value(input.clone())
                    .map_err(|e| format!("input does not match the definition: {e}"))?;
                f(&typed, outputs)
            }));
            plans.push(step.plan);
        }
        Ok(Definition {
            plan: Arc::new(Plan {
                name: self.name,
                version: self.version,
                mode: self.mode,
                steps: plans,
            }),
            validate: {
                let check = self.check;
                Arc::new(move |input: &Value| {
                    let typed =
                        serde_json::from_value::<I>(input.clone()).map_err(|e| e.to_string())?;
                    match &check {
                        Some(check) => check(&typed),
                        None => Ok(()),
                    }
                })
            },
            commands: commands.into(),
            source: Source::Code,
        })
    }
}

pub(crate) fn valid_name(what: &str, name: &str) -> Result<(), DefinitionError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DefinitionError::Invalid(format!(
            "{what} {name:?} must be 1-100 characters of [A-Za-z0-9_.-]"
        )))
    }
}

/// The definitions an orchestrator knows, by name and version. It grows at run time (a
/// document registered through the API, or loaded from the store), so it is shared behind an
/// `Arc` and read through clones of its definitions (a definition is a few `Arc`s).
#[derive(Debug, Default)]
pub struct Registry {
    by_name: RwLock<HashMap<String, BTreeMap<u32, Definition>>>,
}

impl Clone for Registry {
    fn clone(&self) -> Registry {
        Registry {
            by_name: RwLock::new(self.read().clone()),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, BTreeMap<u32, Definition>>> {
        self.by_name.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a definition; a second one with the same name and version is refused.
    pub fn register(&mut self, def: Definition) -> Result<(), DefinitionError> {
        self.insert(def)
    }

    /// Registers a definition in a registry in use; a second one with the same name and
    /// version is refused.
    pub fn insert(&self, def: Definition) -> Result<(), DefinitionError> {
        let mut by_name = self.by_name.write().unwrap_or_else(|e| e.into_inner());
        let versions = by_name.entry(def.name().to_owned()).or_default();
        if versions.contains_key(&def.version()) {
            return Err(DefinitionError::Duplicate(
                def.name().to_owned(),
                def.version(),
            ));
        }
        versions.insert(def.version(), def);
        Ok(())
    }

    /// Registers a definition, builder style.
    pub fn with(mut self, def: Definition) -> Result<Registry, DefinitionError> {
        self.register(def)?;
        Ok(self)
    }

    /// The newest version of the definition named `name`.
    pub fn latest(&self, name: &str) -> Option<Definition> {
        self.read().get(name)?.values().next_back().cloned()
    }

    /// The definition `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<Definition> {
        self.read().get(name)?.get(&version).cloned()
    }

    /// The definition `name` at `version`, or its newest version when `version` is `None`.
    pub fn find(&self, name: &str, version: Option<u32>) -> Option<Definition> {
        match version {
            Some(v) => self.get(name, v),
            None => self.latest(name),
        }
    }

    /// Every registered definition, by name then version.
    pub fn iter(&self) -> impl Iterator<Item = Definition> + use<> {
        let by_name = self.read();
        let mut names: Vec<_> = by_name.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| by_name[n].values().cloned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The names of every participant any definition uses, sorted and deduplicated.
    pub fn participants(&self) -> Vec<String> {
        let mut all: Vec<String> = self.iter().flat_map(|d| d.participants()).collect();
        all.sort();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Order {
        qty: u32,
    }

    fn order_saga(version: u32) -> Definition {
        Definition::saga::<Order>("order", version)
            .step("reserve", "inventory", |s| {
                s.command(|o, _| json!({"qty": o.qty}))
            })
            .step("charge", "payment", |s| {
                s.command(
                    |o, out| json!({"qty": o.qty, "reservation": out.get("reserve").cloned()}),
                )
            })
            .build()
            .unwrap()
    }

    #[test]
    fn commands_are_computed_from_the_typed_input_and_earlier_outputs() {
        let def = order_saga(1);
        let outputs = vec![Some(json!("r-1")), None];
        let o = Outputs::new(&def.plan().steps, &outputs);
        assert_eq!(
            def.command(0, &json!({"qty": 2}), &o).unwrap(),
            json!({"qty": 2})
        );
        assert_eq!(
            def.command(1, &json!({"qty": 2}), &o).unwrap(),
            json!({"qty": 2, "reservation": "r-1"})
        );
    }

    #[test]
    fn input_of_the_wrong_shape_is_refused_with_the_reason() {
        let def = order_saga(1);
        let err = def.validate_input(&json!({"qty": "two"})).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        assert!(def.validate_input(&json!({"qty": 2})).is_ok());
    }

    #[test]
    fn business_rules_on_the_input_are_checked_after_its_type() {
        let def = Definition::saga::<Order>("order", 1)
            .validate(|o| {
                if o.qty == 0 {
                    Err("qty must be positive".into())
                } else {
                    Ok(())
                }
            })
            .step("reserve", "inventory", |s| {
                s.command(|o, _| json!({"qty": o.qty}))
            })
            .build()
            .unwrap();
        assert_eq!(
            def.validate_input(&json!({"qty": 0})).unwrap_err(),
            "qty must be positive"
        );
        assert!(def.validate_input(&json!({"qty": 1})).is_ok());
        assert!(
            def.validate_input(&json!({}))
                .unwrap_err()
                .contains("missing field")
        );
    }

    #[test]
    fn dependencies_are_resolved_to_earlier_steps_and_default_to_the_previous_one() {
        let def = Definition::saga::<Order>("order", 1)
            .step("create", "orders", |s| s.command(|_, _| json!({})))
            .step("reserve", "inventory", |s| s.command(|_, _| json!({})))
            .step("charge", "payment", |s| {
                s.command(|_, _| json!({})).after(["create"])
            })
            .step("confirm", "orders", |s| {
                s.command(|_, _| json!({})).after(["charge", "reserve"])
            })
            .build()
            .unwrap();
        let plan = def.plan();
        assert_eq!(plan.deps(0), Vec::<usize>::new());
        assert_eq!(plan.deps(1), vec![0]);
        assert_eq!(plan.deps(2), vec![0]);
        assert_eq!(plan.deps(3), vec![1, 2]);
        assert_eq!(plan.dependents(0), vec![1, 2]);
        let forward = Definition::saga::<Order>("o", 1)
            .step("a", "p", |s| s.command(|_, _| json!({})).after(["b"]))
            .step("b", "p", |s| s.command(|_, _| json!({})))
            .build();
        assert!(
            matches!(forward, Err(DefinitionError::Invalid(m)) if m.contains("not an earlier step"))
        );
        let tcc = Definition::tcc::<Order>("t", 1)
            .step("a", "p", |s| s.command(|_, _| json!({})))
            .step("b", "p", |s| s.command(|_, _| json!({})).after(["a"]))
            .build();
        assert!(tcc.is_err());
    }

    #[test]
    fn a_wait_step_has_no_participant_and_tcc_or_a_signal_waited_for_twice_is_refused() {
        let def = Definition::saga::<Order>("pay", 1)
            .step("hold", "payment", |s| s.command(|_, _| json!({})))
            .wait("authorize", "3ds", |s| s.timeout(Duration::from_secs(60)))
            .build()
            .unwrap();
        let wait = &def.plan().steps[1];
        assert_eq!(
            (wait.signal.as_deref(), wait.timeout_ms, wait.is_wait()),
            (Some("3ds"), 60_000, true)
        );
        assert_eq!(def.participants(), vec!["payment"]);
        let graph = Definition::saga::<Order>("pay", 1)
            .step("hold", "payment", |s| s.command(|_, _| json!({})))
            .step("ship", "courier", |s| {
                s.command(|_, _| json!({})).after(["hold"])
            })
            .wait("authorize", "3ds", |s| s.after(["hold"]))
            .step("capture", "payment", |s| {
                s.command(|_, _| json!({})).after(["authorize", "ship"])
            })
            .build()
            .unwrap();
        assert_eq!(graph.plan().deps(2), vec![0]);
        assert_eq!(graph.plan().deps(3), vec![1, 2]);
        let tcc = Definition::tcc::<Order>("t", 1)
            .wait("authorize", "3ds", |s| s)
            .build();
        assert!(
            matches!(tcc, Err(DefinitionError::Invalid(m)) if m.contains("cannot wait for a signal"))
        );
        let twice = Definition::saga::<Order>("t", 1)
            .wait("a", "3ds", |s| s)
            .wait("b", "3ds", |s| s)
            .build();
        assert!(matches!(twice, Err(DefinitionError::Invalid(m)) if m.contains("two steps")));
        let bad = Definition::saga::<Order>("t", 1)
            .wait("a", "no spaces", |s| s)
            .build();
        assert!(bad.is_err());
    }

    #[test]
    fn definitions_without_steps_or_with_repeated_names_are_refused() {
        let empty = Definition::saga::<Order>("empty", 1).build();
        assert!(matches!(empty, Err(DefinitionError::Invalid(_))));
        let twice = Definition::saga::<Order>("twice", 1)
            .step("a", "p", |s| s.command(|_, _| json!(1)))
            .step("a", "p", |s| s.command(|_, _| json!(2)))
            .build();
        assert!(matches!(twice, Err(DefinitionError::Invalid(m)) if m.contains("twice")));
        let bad = Definition::saga::<Order>("has space", 1)
            .step("a", "p", |s| s.command(|_, _| json!(1)))
            .build();
        assert!(bad.is_err());
        for dots in [".", ".."] {
            let bad = Definition::saga::<Order>(dots, 1)
                .step("a", "p", |s| s.command(|_, _| json!(1)))
                .build();
            assert!(
                matches!(&bad, Err(DefinitionError::Invalid(m)) if m.ends_with("cannot be . or ..")),
                "{bad:?}"
            );
        }
        assert!(
            Definition::saga::<Order>("...", 1)
                .step("a", "p", |s| s.command(|_, _| json!(1)))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn the_registry_serves_the_latest_version_and_refuses_duplicates() {
        let mut reg = Registry::new();
        reg.register(order_saga(1)).unwrap();
        reg.register(order_saga(2)).unwrap();
        assert_eq!(reg.latest("order").unwrap().version(), 2);
        assert_eq!(reg.get("order", 1).unwrap().version(), 1);
        assert_eq!(
            reg.register(order_saga(2)).unwrap_err(),
            DefinitionError::Duplicate("order".into(), 2)
        );
        assert_eq!(reg.participants(), vec!["inventory", "payment"]);
    }

    #[test]
    fn a_plan_stored_under_the_same_version_must_be_the_same_and_the_refusal_names_what_changed() {
        let def = order_saga(1);
        assert!(def.check_stored(def.plan(), None).is_ok());
        let changed = Definition::saga::<Order>("order", 1)
            .step("reserve", "inventory", |s| {
                s.command(|o, _| json!({"qty": o.qty}))
                    .timeout(Duration::from_secs(3))
            })
            .step("charge", "billing", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        let err = changed.check_stored(def.plan(), None).unwrap_err();
        let DefinitionError::Changed { differences, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            differences,
            &vec![
                "step `reserve` timeout_ms changed from 10000 to 3000".to_owned(),
                "step `charge` participant changed from \"payment\" to \"billing\"".to_owned(),
            ]
        );
        let message = err.to_string();
        assert!(
            message
                .starts_with("definition order v1 differs from the one registered: step `reserve`"),
            "{message}"
        );
        assert!(message.ends_with("bump the version"), "{message}");
        assert!(
            def.check_stored(def.plan(), Some(&json!({"name": "order"})))
                .unwrap_err()
                .to_string()
                .contains("registered as a document")
        );
    }

    #[test]
    fn a_fingerprint_is_the_same_for_equal_plans_and_changes_with_dependencies() {
        let plain = order_saga(1);
        assert_eq!(
            plain.plan().fingerprint(),
            order_saga(1).plan().fingerprint()
        );
        let parallel = Definition::saga::<Order>("order", 1)
            .step("reserve", "inventory", |s| s.command(|_, _| json!({})))
            .step("charge", "payment", |s| {
                s.command(|_, _| json!({})).after(Vec::<String>::new())
            })
            .build()
            .unwrap();
        assert_ne!(plain.plan().fingerprint(), parallel.plan().fingerprint());
        assert_eq!(
            plain.plan().differences(parallel.plan()),
            vec!["step `charge` after changed from [reserve] to []".to_owned()]
        );
    }

    #[test]
    fn a_changed_retry_policy_is_named_field_by_field() {
        let retried = Definition::saga::<Order>("order", 1)
            .step("reserve", "inventory", |s| {
                s.command(|_, _| json!({}))
                    .retry(RetryPolicy {
                        max_attempts: 5,
                        ..RetryPolicy::FORWARD
                    })
                    .finish_retry(RetryPolicy {
                        jitter: 0.5,
                        ..RetryPolicy::FINISH
                    })
            })
            .step("charge", "payment", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        assert_eq!(
            order_saga(1).plan().differences(retried.plan()),
            vec![
                "step `reserve` retry.max_attempts changed from 3 to 5".to_owned(),
                "step `reserve` finish_retry.jitter changed from 0.2 to 0.5".to_owned(),
            ]
        );
    }

    #[test]
    fn a_negative_zero_in_a_retry_policy_has_the_fingerprint_of_zero_as_the_store_gives_it_back() {
        let with = |jitter: f64| {
            let policy = RetryPolicy {
                jitter,
                ..RetryPolicy::FORWARD
            };
            Definition::saga::<Order>("order", 1)
                .step("reserve", "inventory", |s| {
                    s.command(|_, _| json!({}))
                        .retry(policy)
                        .finish_retry(policy)
                })
                .build()
                .unwrap()
        };
        let (negative, zero) = (with(-0.0), with(0.0));
        assert_eq!(negative.plan().fingerprint(), zero.plan().fingerprint());
        assert!(negative.plan().differences(zero.plan()).is_empty());
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_and_jitter_only_shortens_it() {
        let p = RetryPolicy::exponential(5, Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(p.base_delay_ms(1), 100);
        assert_eq!(p.base_delay_ms(2), 200);
        assert_eq!(p.base_delay_ms(3), 350);
        assert_eq!(p.base_delay_ms(30), 350);
        let p = p.with_jitter(0.5);
        assert_eq!(p.delay_ms(2, 0.0), 200);
        assert_eq!(p.delay_ms(2, 0.999), 100);
    }
}
