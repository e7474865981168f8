//! The JSON Schemas of the message bodies (docs/schemas/), generated from the Rust types, and
//! the example bodies of docs/protocol.md checked against them and against the runtime's own
//! decoding.
//!
//! A failing comparison means the types changed: check that the change is one the protocol
//! allows (docs/protocol.md, "Versioning"), then regenerate the files with
//! `SAGAS_UPDATE_SCHEMAS=1 cargo test -p sagas-participant --test it -- schemas::`.

use std::path::PathBuf;

use jsonschema::Validator;
use sagas_participant::protocol::{
    Command, MAX_BATCH, Reply, StartAnswer, StartCommand, split_batch,
};
use sagas_participant::runtime::decode_command;
use schemars::{JsonSchema, Schema, schema_for};
use serde_json::Value;

/// The body of a command batch.
#[derive(JsonSchema)]
#[schemars(
    title = "Command batch",
    description = "The body of a command batch (content type application/vnd.sagas.batch+json): 1 to 256 commands, each judged on its own (docs/protocol.md, \"Batches\")."
)]
#[allow(dead_code)]
struct CommandBatch(#[schemars(length(min = 1, max = MAX_BATCH))] Vec<Command>);

/// The body of a reply batch.
#[derive(JsonSchema)]
#[schemars(
    title = "Reply batch",
    description = "The body of a reply batch (content type application/vnd.sagas.batch+json): 1 to 256 replies, each handled on its own (docs/protocol.md, \"Batches\")."
)]
#[allow(dead_code)]
struct ReplyBatch(#[schemars(length(min = 1, max = MAX_BATCH))] Vec<Reply>);

/// The kinds of body, by the name of their schema file and of the tag of their examples in
/// docs/protocol.md (a fenced block opened with ```` ```json command ````, for instance).
const KINDS: [&str; 6] = [
    "command",
    "reply",
    "command-batch",
    "reply-batch",
    "start",
    "start-answer",
];

fn generate(kind: &str) -> Schema {
    match kind {
        "command" => schema_for!(Command),
        "reply" => schema_for!(Reply),
        "command-batch" => schema_for!(CommandBatch),
        "reply-batch" => schema_for!(ReplyBatch),
        "start" => schema_for!(StartCommand),
        "start-answer" => schema_for!(StartAnswer),
        other => unreachable!("no schema for {other}"),
    }
}

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn schema_file(kind: &str) -> PathBuf {
    docs().join("schemas").join(format!("{kind}.schema.json"))
}

/// A validator of `kind`'s published schema, checking formats (`uuid`, `date-time`) too.
fn validator(kind: &str) -> Validator {
    let text = std::fs::read_to_string(schema_file(kind)).expect("read the schema");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid JSON Schema")
}

#[test]
fn the_published_schemas_are_those_of_the_rust_types() {
    let update = std::env::var_os("SAGAS_UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for kind in KINDS {
        let text = serde_json::to_string_pretty(&generate(kind)).unwrap() + "\n";
        let path = schema_file(kind);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the Rust types of the protocol. If the change is one the \
         protocol allows (docs/protocol.md, \"Versioning\"), regenerate them with \
         `SAGAS_UPDATE_SCHEMAS=1 cargo test -p sagas-participant --test it -- schemas::` \
         and commit them."
    );
}

/// The fenced blocks of docs/protocol.md opened with ```` ```json {tag} ````.
fn examples(tag: &str) -> Vec<String> {
    let text = std::fs::read_to_string(docs().join("protocol.md")).expect("read protocol.md");
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != format!("```json {tag}") {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        found.push(block.join("\n"));
    }
    found
}

/// Whether the runtime takes `body` as `kind`, element by element for a batch.
fn decodes(kind: &str, body: &str) -> Result<(), String> {
    let one = |kind: &str, element: &str| match kind {
        "command" => decode_command(element.as_bytes())
            .map(drop)
            .map_err(|e| e.to_string()),
        "start" => serde_json::from_str::<StartCommand>(element)
            .map(drop)
            .map_err(|e| e.to_string()),
        "start-answer" => serde_json::from_str::<StartAnswer>(element)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => serde_json::from_str::<Reply>(element)
            .map(drop)
            .map_err(|e| e.to_string()),
    };
    match kind.strip_suffix("-batch") {
        None => one(kind, body),
        Some(single) => split_batch(body.as_bytes())?
            .iter()
            .try_for_each(|element| one(single, element.get())),
    }
}

#[test]
fn every_example_body_in_the_protocol_document_is_valid_and_decodes() {
    for kind in KINDS {
        let validator = validator(kind);
        let bodies = examples(kind);
        assert!(
            !bodies.is_empty(),
            "protocol.md has no `json {kind}` example"
        );
        for body in bodies {
            let value: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("a {kind} example is not JSON ({e}):\n{body}"));
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{kind} example:\n{body}\n{errors:?}");
            decodes(kind, &body)
                .unwrap_or_else(|e| panic!("the runtime refuses a {kind} example ({e}):\n{body}"));
        }
    }
}

#[test]
fn the_dead_lettered_example_command_is_refused_by_the_schema_and_the_runtime() {
    let validator = validator("command");
    let bodies = examples("dead-letter");
    assert!(
        !bodies.is_empty(),
        "protocol.md has no `json dead-letter` example"
    );
    for body in bodies {
        let value: Value = serde_json::from_str(&body).expect("JSON");
        assert!(!validator.is_valid(&value), "the schema takes:\n{body}");
        assert!(
            decode_command(body.as_bytes()).is_err(),
            "the runtime takes:\n{body}"
        );
    }
}

#[test]
fn the_command_schema_refuses_what_the_runtime_dead_letters_and_takes_what_it_takes() {
    let validator = validator("command");
    let valid = serde_json::json!({
        "protocol": 1,
        "transaction_id": "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
        "definition": "transfer",
        "step": "debit",
        "operation": "try",
        "attempt": 1,
        "payload": null,
        "deadline": "2025-06-01T12:00:05.123456Z",
        "an_unknown_field": "is ignored"
    });
    let variants: Vec<(&str, Value)> = vec![
        ("valid", valid.clone()),
        ("attempt 0", with(&valid, "attempt", 0.into())),
        ("attempt -1", with(&valid, "attempt", (-1).into())),
        (
            "not a UUID",
            with(&valid, "transaction_id", "order-42".into()),
        ),
        (
            "unknown operation",
            with(&valid, "operation", "commit".into()),
        ),
        ("protocol 2", with(&valid, "protocol", 2.into())),
        ("not a date", with(&valid, "deadline", "tomorrow".into())),
        ("no payload", without(&valid, "payload")),
        ("no step", without(&valid, "step")),
    ];
    for (what, body) in variants {
        let by_runtime = decode_command(&serde_json::to_vec(&body).unwrap()).is_ok();
        assert_eq!(validator.is_valid(&body), by_runtime, "{what}");
        assert_eq!(by_runtime, what == "valid", "{what}");
    }
    // The one difference, as docs/protocol.md says: the schema wants the hyphenated form.
    let simple = with(
        &valid,
        "transaction_id",
        "0197a3c45e6f7a8b9c0d1e2f3a4b5c6d".into(),
    );
    assert!(decode_command(&serde_json::to_vec(&simple).unwrap()).is_ok());
    assert!(!validator.is_valid(&simple));
}

fn with(value: &Value, field: &str, to: Value) -> Value {
    let mut value = value.clone();
    value[field] = to;
    value
}

fn without(value: &Value, field: &str) -> Value {
    let mut value = value.clone();
    value.as_object_mut().unwrap().remove(field);
    value
}
