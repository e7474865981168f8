//! Definitions as documents (YAML or JSON): their schema, the command templates over the
//! input and earlier steps' outputs, and their compilation into a [`Definition`], the same
//! one the builder makes (docs/definitions.md specifies the format).
//!
//! A command template is JSON in which an object `{"$ref": POINTER}` stands for the value
//! that the JSON Pointer (RFC 6901) selects from `{"input": …, "outputs": {STEP: …}}` (with
//! `"default": VALUE` beside it, VALUE when it selects nothing), and `{"$literal": VALUE}` for
//! VALUE as it is. Nothing else is evaluated: no I/O, no clock, no
//! randomness, so a template gives the same command for the same input and outputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::definition::{Definition, DefinitionError, Mode, Outputs, RetryPolicy, Source, Step};

/// A definition document's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    name: String,
    version: u32,
    #[serde(default = "saga")]
    mode: Mode,
    #[serde(default)]
    input_schema: Option<Value>,
    steps: Vec<Value>,
}

fn saga() -> Mode {
    Mode::Saga
}

/// One step of a document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentStep {
    name: String,
    #[serde(default)]
    participant: Option<String>,
    /// A wait step's signal, instead of `participant` and `command`.
    #[serde(default)]
    signal: Option<String>,
    #[serde(default)]
    after: Option<Vec<String>>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    in_progress_timeout_ms: Option<u64>,
    #[serde(default)]
    retry: Option<RetrySpec>,
    #[serde(default)]
    finish_retry: Option<RetrySpec>,
    #[serde(default)]
    command: Option<Value>,
}

/// A retry policy in a document: each field left out keeps the default's.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrySpec {
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

impl RetrySpec {
    fn over(self, default: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(default.max_attempts),
            initial_backoff_ms: self
                .initial_backoff_ms
                .unwrap_or(default.initial_backoff_ms),
            max_backoff_ms: self.max_backoff_ms.unwrap_or(default.max_backoff_ms),
            multiplier: self.multiplier.unwrap_or(default.multiplier),
            jitter: self.jitter.unwrap_or(default.jitter),
        }
    }
}

fn invalid(message: String) -> DefinitionError {
    DefinitionError::Invalid(message)
}

/// Reads a document: JSON when its first character (after white space) is `{`, YAML
/// otherwise. The result is the document as JSON, as it is stored.
pub fn parse(text: &str) -> Result<Value, DefinitionError> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| invalid(format!("not a JSON document: {e}")))
    } else {
        serde_norway::from_str(text).map_err(|e| invalid(format!("not a YAML document: {e}")))
    }
}

/// A document file read: its path, and its document or why it could not be read.
pub type DocumentFile = (PathBuf, Result<Value, DefinitionError>);

/// Reads the document file `path`, or every `*.yaml`, `*.yml` and `*.json` file of the
/// directory `path` (not its subdirectories) in name order, each with its path and its
/// document, or what is wrong with it: one bad file does not hide the others.
pub fn read_path(path: &Path) -> Result<Vec<DocumentFile>, DefinitionError> {
    let io = |p: &Path, e: std::io::Error| invalid(format!("{}: {e}", p.display()));
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    Ok(files
        .into_iter()
        .map(|file| {
            let doc = std::fs::read_to_string(&file)
                .map_err(|e| invalid(e.to_string()))
                .and_then(|text| parse(&text));
            (file, doc)
        })
        .collect())
}

/// The definition a document describes, with its plan checked as the builder checks one and
/// its templates checked against the plan: a selection from the output of a step that is
/// unknown, or that does not succeed before the step runs, is refused here.
pub fn compile(document: &Value) -> Result<Definition, DefinitionError> {
    let doc: Document =
        serde_json::from_value(document.clone()).map_err(|e| invalid(format!("document: {e}")))?;
    let what = format!("{} v{}", doc.name, doc.version);
    let schema = match &doc.input_schema {
        None => None,
        Some(schema) => Some(Arc::new(jsonschema::validator_for(schema).map_err(
            |e| {
                invalid(format!(
                    "{what}: input_schema is not a valid JSON Schema: {e}"
                ))
            },
        )?)),
    };
    let mut steps = Vec::with_capacity(doc.steps.len());
    for (i, step) in doc.steps.iter().enumerate() {
        let step: DocumentStep = serde_json::from_value(step.clone()).map_err(|e| {
            let name = doc.steps[i]
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("?");
            invalid(format!("{what}: steps[{i}] ({name}): {e}"))
        })?;
        let at = format!("{what} step {} command", step.name);
        let template = match (&step.participant, &step.signal, &step.command) {
            (Some(_), None, Some(command)) => {
                Some(Template::compile(command, &mut String::new(), &at)?)
            }
            (None, Some(_), None)
                if step.retry.is_none()
                    && step.finish_retry.is_none()
                    && step.in_progress_timeout_ms.is_none() =>
            {
                None
            }
            _ => {
                return Err(invalid(format!(
                    "{what}: steps[{i}] ({}): a step has a `participant` and a `command`, or \
                     is a wait with a `signal` and none of `participant`, `command`, `retry`, \
                     `finish_retry` or `in_progress_timeout_ms`",
                    step.name
                )));
            }
        };
        steps.push((step, template));
    }
    let builder = match doc.mode {
        Mode::Saga => Definition::saga::<Value>(doc.name.clone(), doc.version),
        Mode::Tcc => Definition::tcc::<Value>(doc.name.clone(), doc.version),
    };
    let builder = match schema {
        None => builder,
        Some(schema) => builder.validate(move |input| check_input(&schema, input)),
    };
    let mut builder = builder;
    let mut templates = Vec::with_capacity(steps.len());
    for (step, template) in steps {
        for (field, ms) in [
            ("timeout_ms", step.timeout_ms),
            ("in_progress_timeout_ms", step.in_progress_timeout_ms),
        ] {
            if ms == Some(0) {
                return Err(invalid(format!(
                    "{what} step {}: {field} must be at least 1",
                    step.name
                )));
            }
        }
        let Some(template) = template else {
            let signal = step.signal.clone().unwrap_or_default();
            builder = builder.wait(step.name.clone(), signal, |s| configure_wait(s, &step));
            continue;
        };
        let command = Arc::new(template.clone());
        templates.push((step.name.clone(), template));
        let participant = step.participant.clone().unwrap_or_default();
        builder = builder.step(step.name.clone(), participant, move |s| {
            configure(s, &step, command)
        });
    }
    let def = builder.build()?;
    let plan = def.plan();
    for (name, template) in &templates {
        let i = plan.step_index(name).expect("a step of the plan");
        let before = match plan.mode {
            Mode::Tcc => Vec::new(),
            Mode::Saga => plan.ancestors(i),
        };
        for step in template.steps() {
            if plan.step_index(step).is_none() {
                return Err(invalid(format!(
                    "{what} step {name} command selects the output of step {step:?}, which is \
                     not a step of {}",
                    plan.name
                )));
            }
            if !before.iter().any(|&j| plan.steps[j].name == step) {
                let why = match plan.mode {
                    Mode::Tcc => "TCC branches are all tried at once".to_owned(),
                    Mode::Saga => format!("{step} is not among the steps {name} runs after"),
                };
                return Err(invalid(format!(
                    "{what} step {name} command selects the output of step {step}, which does \
                     not succeed before it ({why})"
                )));
            }
        }
    }
    Ok(def.with_source(Source::Document {
        document: Arc::new(document.clone()),
        hash: content_hash(document),
    }))
}

/// A step of the builder configured as the document says.
fn configure(s: Step<Value>, step: &DocumentStep, template: Arc<Template>) -> Step<Value> {
    let mut s = s
        .try_command(move |input, outputs| template.render(input, outputs))
        .retry(step.retry.unwrap_or_default().over(RetryPolicy::FORWARD))
        .finish_retry(
            step.finish_retry
                .unwrap_or_default()
                .over(RetryPolicy::FINISH),
        );
    if let Some(ms) = step.in_progress_timeout_ms {
        s = s.in_progress_timeout(Duration::from_millis(ms));
    }
    configure_wait(s, step)
}

/// What a wait step and a step with a command both take from the document: the timeout
/// and the steps it runs after.
fn configure_wait(mut s: Step<Value>, step: &DocumentStep) -> Step<Value> {
    if let Some(ms) = step.timeout_ms {
        s = s.timeout(Duration::from_millis(ms));
    }
    if let Some(after) = &step.after {
        s = s.after(after.clone());
    }
    s
}

/// What is wrong with `input` by the document's JSON Schema: every error, each with where it
/// is in the input (a JSON Pointer).
fn check_input(schema: &jsonschema::Validator, input: &Value) -> Result<(), String> {
    let errors: Vec<String> = schema
        .iter_errors(input)
        .map(|e| {
            let path = e.instance_path().as_str().to_owned();
            let path = if path.is_empty() {
                "/".to_owned()
            } else {
                path
            };
            format!("{path}: {e}")
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// A compiled command template.
#[derive(Debug, Clone, PartialEq)]
enum Template {
    /// A value as it is.
    Literal(Value),
    /// `{"$ref": …}`: what the pointer selects.
    Select(Selection),
    /// An array of templates.
    Array(Vec<Template>),
    /// An object of templates.
    Object(Vec<(String, Template)>),
}

/// A selection: from the input, or from a step's output, then along a JSON Pointer.
#[derive(Debug, Clone, PartialEq)]
struct Selection {
    /// The pointer as written.
    text: String,
    /// The step whose output it selects from, or `None` for the input.
    step: Option<String>,
    /// The pointer within the input or the output.
    rest: String,
    /// What it stands for when the pointer selects nothing.
    default: Option<Value>,
}

impl Template {
    /// Compiles the template `value` found at `path` (a JSON Pointer within the command) of
    /// `at` (the document and step, for messages).
    fn compile(value: &Value, path: &mut String, at: &str) -> Result<Template, DefinitionError> {
        let here = |path: &str| {
            if path.is_empty() {
                "/".to_owned()
            } else {
                path.to_owned()
            }
        };
        match value {
            Value::Object(map) if map.keys().any(|k| k.starts_with('$')) => {
                let pointer = map.get("$ref").and_then(Value::as_str);
                let default = map.get("default");
                let only = |n: usize| map.len() == n;
                match (pointer, default) {
                    (Some(_), None) if only(1) => {}
                    (Some(_), Some(_)) if only(2) => {}
                    (None, _) if only(1) && map.contains_key("$literal") => {
                        return Ok(Template::Literal(map["$literal"].clone()));
                    }
                    _ => {
                        return Err(invalid(format!(
                            "{at} at {}: an object with a key starting with `$` must be exactly \
                             {{\"$ref\": \"/pointer\"}}, {{\"$ref\": \"/pointer\", \"default\": \
                             value}} or {{\"$literal\": value}}",
                            here(path)
                        )));
                    }
                }
                let pointer = pointer.unwrap_or_default();
                let mut selection = Selection::parse(pointer)
                    .map_err(|e| invalid(format!("{at} at {}: {e}", here(path))))?;
                selection.default = default.cloned();
                Ok(Template::Select(selection))
            }
            Value::Object(map) => {
                let mut fields = Vec::with_capacity(map.len());
                for (k, v) in map {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    fields.push((k.clone(), Template::compile(v, path, at)?));
                    path.truncate(len);
                }
                Ok(Template::Object(fields))
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    out.push(Template::compile(v, path, at)?);
                    path.truncate(len);
                }
                Ok(Template::Array(out))
            }
            other => Ok(Template::Literal(other.clone())),
        }
    }

    /// The steps whose outputs the template selects from.
    fn steps(&self) -> Vec<&str> {
        match self {
            Template::Literal(_) => Vec::new(),
            Template::Select(s) => s.step.as_deref().into_iter().collect(),
            Template::Array(items) => items.iter().flat_map(Template::steps).collect(),
            Template::Object(fields) => fields.iter().flat_map(|(_, t)| t.steps()).collect(),
        }
    }

    /// The command for `input` and `outputs`.
    fn render(&self, input: &Value, outputs: &Outputs<'_>) -> Result<Value, String> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Select(s) => s.select(input, outputs)?,
            Template::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.render(input, outputs))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for (k, t) in fields {
                    map.insert(k.clone(), t.render(input, outputs)?);
                }
                Value::Object(map)
            }
        })
    }
}

impl Selection {
    /// `/input…` or `/outputs/STEP…`.
    fn parse(pointer: &str) -> Result<Selection, String> {
        let text = pointer.to_owned();
        let Some(path) = pointer.strip_prefix('/') else {
            return Err(format!(
                "{pointer:?} is not a JSON Pointer from the root (it must start with /input or \
                 /outputs/STEP)"
            ));
        };
        // RFC 6901: `~` only as `~0` (for `~`) or `~1` (for `/`).
        let mut chars = path.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!(
                    "{pointer:?} is not a JSON Pointer: `~` must be followed by 0 or 1 (`~0` \
                     stands for `~`, `~1` for `/`)"
                ));
            }
        }
        let (root, rest) = path.split_once('/').map_or((path, ""), |(r, p)| (r, p));
        match root {
            "input" => Ok(Selection {
                text,
                default: None,
                step: None,
                rest: if rest.is_empty() {
                    String::new()
                } else {
                    format!("/{rest}")
                },
            }),
            "outputs" if !rest.is_empty() => {
                let (step, within) = rest.split_once('/').map_or((rest, ""), |(s, p)| (s, p));
                Ok(Selection {
                    text: text.clone(),
                    default: None,
                    step: Some(step.replace("~1", "/").replace("~0", "~")),
                    rest: if within.is_empty() {
                        String::new()
                    } else {
                        format!("/{within}")
                    },
                })
            }
            _ => Err(format!(
                "{pointer:?} selects neither /input nor /outputs/STEP"
            )),
        }
    }

    fn select(&self, input: &Value, outputs: &Outputs<'_>) -> Result<Value, String> {
        let from = match &self.step {
            None => Some(input),
            Some(step) => outputs.get(step),
        };
        match (from.and_then(|f| f.pointer(&self.rest)), &self.default) {
            (Some(found), _) => Ok(found.clone()),
            (None, Some(default)) => Ok(default.clone()),
            (None, None) => match (&self.step, from) {
                (Some(step), None) => Err(format!("{}: step {step} has no output", self.text)),
                _ => Err(format!("{} selects nothing", self.text)),
            },
        }
    }
}

/// The content hash of a document: `sha256:` and the hex digest of its canonical JSON (object
/// keys sorted, no white space), so that the same document in YAML or JSON, or with its keys
/// in another order, has one hash.
pub fn content_hash(document: &Value) -> String {
    let mut canonical = Vec::new();
    write_canonical(document, &mut canonical);
    let digest = Sha256::digest(&canonical);
    let mut hash = String::with_capacity(7 + 64);
    hash.push_str("sha256:");
    for byte in digest {
        hash.push_str(&format!("{byte:02x}"));
    }
    hash
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(key).expect("a string serializes"));
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        // -0.0 is 0.0: PostgreSQL's jsonb stores both as 0.0.
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => out.extend(b"0.0"),
        scalar => out.extend(serde_json::to_vec(scalar).expect("a JSON value serializes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TRANSFER_YAML: &str = r#"
name: transfer
version: 3
input_schema:
  type: object
  required: [from, to, amount]
  properties:
    from: {type: string}
    to: {type: string}
    amount: {type: integer, exclusiveMinimum: 0}
steps:
  - name: debit
    participant: accounts
    timeout_ms: 5000
    retry: {max_attempts: 5}
    command:
      account: {$ref: /input/from}
      delta: {$ref: /input/amount}
  - name: credit
    participant: accounts
    command:
      account: {$ref: /input/to}
      debit: {$ref: /outputs/debit}
      tags: [transfer, {$literal: {$ref: not evaluated}}]
"#;

    fn outputs_of(def: &Definition, values: &[Option<Value>]) -> Vec<Option<Value>> {
        let mut all = values.to_vec();
        all.resize(def.plan().steps.len(), None);
        all
    }

    #[test]
    fn a_document_compiles_to_the_plan_the_builder_makes() {
        let def = compile(&parse(TRANSFER_YAML).unwrap()).unwrap();
        let built = Definition::saga::<Value>("transfer", 3)
            .step("debit", "accounts", |s| {
                s.command(|_, _| json!({}))
                    .timeout(Duration::from_secs(5))
                    .retry(RetryPolicy {
                        max_attempts: 5,
                        ..RetryPolicy::FORWARD
                    })
            })
            .step("credit", "accounts", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        assert_eq!(def.plan(), built.plan());
        assert!(matches!(def.source(), Source::Document { .. }));
    }

    #[test]
    fn templates_select_from_the_input_and_earlier_outputs_and_take_literals_as_they_are() {
        let def = compile(&parse(TRANSFER_YAML).unwrap()).unwrap();
        let input = json!({"from": "a", "to": "b", "amount": 7});
        let none = outputs_of(&def, &[]);
        let outputs = Outputs::new(&def.plan().steps, &none);
        assert_eq!(
            def.command(0, &input, &outputs).unwrap(),
            json!({"account": "a", "delta": 7})
        );
        let err = def.command(1, &input, &outputs).unwrap_err();
        assert_eq!(err, "/outputs/debit: step debit has no output");
        let done = outputs_of(&def, &[Some(json!({"balance": 93}))]);
        let outputs = Outputs::new(&def.plan().steps, &done);
        assert_eq!(
            def.command(1, &input, &outputs).unwrap(),
            json!({"account": "b", "debit": {"balance": 93},
                   "tags": ["transfer", {"$ref": "not evaluated"}]})
        );
        let with_default = Template::compile(
            &json!({"s": {"$ref": "/input/simulate", "default": null}}),
            &mut String::new(),
            "t",
        )
        .unwrap();
        assert_eq!(
            with_default.render(&json!({}), &outputs).unwrap(),
            json!({"s": null})
        );
        let missing = json!({"from": "a", "amount": 7});
        assert_eq!(
            def.command(1, &missing, &outputs).unwrap_err(),
            "/input/to selects nothing"
        );
    }

    #[test]
    fn an_input_that_breaks_the_schema_is_refused_with_every_error_and_where() {
        let def = compile(&parse(TRANSFER_YAML).unwrap()).unwrap();
        assert!(
            def.validate_input(&json!({"from": "a", "to": "b", "amount": 1}))
                .is_ok()
        );
        let err = def
            .validate_input(&json!({"from": 1, "amount": 0}))
            .unwrap_err();
        assert!(err.contains("/: \"to\" is a required property"), "{err}");
        assert!(err.contains("/from: 1 is not of type \"string\""), "{err}");
        assert!(err.contains("/amount: "), "{err}");
        assert_eq!(err.matches("; ").count(), 2, "{err}");
    }

    fn refusal(document: Value) -> String {
        compile(&document).unwrap_err().to_string()
    }

    fn two_steps(second: Value, mode: &str) -> Value {
        json!({
            "name": "d", "version": 1, "mode": mode,
            "steps": [
                {"name": "a", "participant": "p", "command": {}},
                second,
            ]
        })
    }

    #[test]
    fn a_wait_step_compiles_to_the_builder_s_and_its_signal_data_feeds_later_commands() {
        let doc = parse(
            r#"
name: pay
version: 1
steps:
  - {name: hold, participant: payment, command: {}}
  - {name: authorize, signal: 3ds, timeout_ms: 60000}
  - name: capture
    participant: payment
    command: {auth: {$ref: /outputs/authorize/code}}
"#,
        )
        .unwrap();
        let def = compile(&doc).unwrap();
        let built = Definition::saga::<Value>("pay", 1)
            .step("hold", "payment", |s| s.command(|_, _| json!({})))
            .wait("authorize", "3ds", |s| s.timeout(Duration::from_secs(60)))
            .step("capture", "payment", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        assert_eq!(def.plan(), built.plan());
        let done = outputs_of(&def, &[Some(json!({})), Some(json!({"code": "A1"}))]);
        let outputs = Outputs::new(&def.plan().steps, &done);
        assert_eq!(
            def.command(2, &json!({}), &outputs).unwrap(),
            json!({"auth": "A1"})
        );
        for wrong in [
            json!({"name": "b", "signal": "s", "participant": "p"}),
            json!({"name": "b", "signal": "s", "command": {}}),
            json!({"name": "b", "signal": "s", "retry": {"max_attempts": 2}}),
            json!({"name": "b"}),
        ] {
            assert!(
                refusal(two_steps(wrong.clone(), "saga")).contains("is a wait with a `signal`"),
                "{wrong}"
            );
        }
        let tcc = two_steps(json!({"name": "b", "signal": "s"}), "tcc");
        assert!(refusal(tcc).contains("cannot wait for a signal"));
    }

    #[test]
    fn a_selection_from_a_step_that_does_not_succeed_before_is_refused_at_registration() {
        let unknown = two_steps(
            json!({"name": "b", "participant": "p", "command": {"x": {"$ref": "/outputs/zz/id"}}}),
            "saga",
        );
        assert_eq!(
            refusal(unknown),
            "invalid definition: d v1 step b command selects the output of step \"zz\", which \
             is not a step of d"
        );
        let later = json!({"name": "d", "version": 1, "steps": [
            {"name": "a", "participant": "p", "command": {"$ref": "/outputs/b"}},
            {"name": "b", "participant": "p", "command": {}},
        ]});
        assert!(refusal(later).contains("(b is not among the steps a runs after)"));
        let parallel = two_steps(
            json!({"name": "b", "participant": "p", "after": [], "command": {"$ref": "/outputs/a"}}),
            "saga",
        );
        assert!(refusal(parallel).contains("(a is not among the steps b runs after)"));
        let tcc = two_steps(
            json!({"name": "b", "participant": "p", "command": {"$ref": "/outputs/a"}}),
            "tcc",
        );
        assert!(refusal(tcc).contains("TCC branches are all tried at once"));
        let sequential = two_steps(
            json!({"name": "b", "participant": "p", "command": {"$ref": "/outputs/a"}}),
            "saga",
        );
        assert!(compile(&sequential).is_ok());
    }

    #[test]
    fn malformed_documents_are_refused_saying_where() {
        let typo = two_steps(
            json!({"name": "b", "participant": "p", "timeout": 5, "command": {}}),
            "saga",
        );
        let message = refusal(typo);
        assert!(
            message.starts_with("invalid definition: d v1: steps[1] (b): unknown field `timeout`"),
            "{message}"
        );
        let dollar = two_steps(
            json!({"name": "b", "participant": "p", "command": {"x": [1, {"$ref": "/input", "y": 2}]}}),
            "saga",
        );
        assert!(
            refusal(dollar)
                .contains("d v1 step b command at /x/1: an object with a key starting with `$`")
        );
        let pointer = two_steps(
            json!({"name": "b", "participant": "p", "command": {"$ref": "input/amount"}}),
            "saga",
        );
        assert!(refusal(pointer).contains("is not a JSON Pointer from the root"));
        for bad in ["/input/a~2b", "/input/a~", "/outputs/a~/x"] {
            let escape = two_steps(
                json!({"name": "b", "participant": "p", "command": {"x": {"$ref": bad}}}),
                "saga",
            );
            let message = refusal(escape);
            assert!(
                message.contains("at /x: ") && message.contains("`~` must be followed by 0 or 1"),
                "{message}"
            );
        }
        let zero = two_steps(
            json!({"name": "b", "participant": "p", "timeout_ms": 0, "command": {}}),
            "saga",
        );
        assert!(refusal(zero).contains("timeout_ms must be at least 1"));
        let schema = json!({"name": "d", "version": 1, "input_schema": {"type": 5},
            "steps": [{"name": "a", "participant": "p", "command": {}}]});
        assert!(refusal(schema).contains("input_schema is not a valid JSON Schema"));
        for remote in ["https://127.0.0.1:9/schema.json", "file:///etc/hostname"] {
            let schema = json!({"name": "d", "version": 1, "input_schema": {"$ref": remote},
                "steps": [{"name": "a", "participant": "p", "command": {}}]});
            let message = refusal(schema);
            assert!(
                message.contains("input_schema is not a valid JSON Schema"),
                "{message}"
            );
        }
        assert!(
            parse("name: [")
                .unwrap_err()
                .to_string()
                .contains("not a YAML document")
        );
        assert!(
            parse("{\"name\": ")
                .unwrap_err()
                .to_string()
                .contains("not a JSON document")
        );
    }

    #[test]
    fn the_content_hash_is_the_same_whatever_the_format_and_key_order() {
        let yaml = parse(TRANSFER_YAML).unwrap();
        let json = parse(&serde_json::to_string_pretty(&yaml).unwrap()).unwrap();
        assert_eq!(content_hash(&yaml), content_hash(&json));
        let a = json!({"b": 1, "a": [true, null, "x"]});
        let b: Value = serde_json::from_str(r#"{"a":[true,null,"x"],"b":1}"#).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(
            content_hash(&a),
            content_hash(&json!({"b": 2, "a": [true, null, "x"]}))
        );
        assert_eq!(
            content_hash(&json!({"jitter": -0.0})),
            content_hash(&json!({"jitter": 0.0}))
        );
        assert_ne!(
            content_hash(&json!({"jitter": 0.0})),
            content_hash(&json!({"jitter": 0}))
        );
        assert!(content_hash(&a).starts_with("sha256:"));
        assert_eq!(content_hash(&a).len(), 7 + 64);
    }
}
