//! Rendering: aligned tables for people, JSON and CSV for machines. Every function returns a
//! `String` so that tests snapshot exactly what a terminal shows.

use serde_json::{Value, json};

use crate::machine::Status;
use crate::reconcile::barrier::BarrierRow;
use crate::reconcile::{FindingKind, Report};
use sagas_participant::protocol::Operation;

/// Aligned columns under a header; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn opt(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

fn time(t: Option<crate::machine::Time>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// The reconciliation report as people read it: the window, counts per definition and
/// status, findings per kind, then every finding.
pub fn report_table(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let window = match (s.since, s.until) {
        (None, None) => "all instances".to_owned(),
        (since, until) => format!(
            "instances created {}{} and older open ones",
            since.map_or(String::new(), |t| format!("from {} ", time(Some(t)))),
            until.map_or("until now".to_owned(), |t| format!(
                "before {}",
                time(Some(t))
            )),
        ),
    };
    out.push_str(&format!(
        "Reconciliation as of {}: {window}{}\n",
        time(s.now),
        s.definition
            .as_ref()
            .map_or(String::new(), |d| format!(" of definition {d}")),
    ));
    out.push_str(&format!(
        "Checked {} instance(s) and {} event(s); participants cross-checked: {}\n\n",
        s.instances,
        s.events,
        if s.participants.is_empty() {
            "none".to_owned()
        } else {
            s.participants.join(", ")
        }
    ));

    let mut headers = vec!["DEFINITION"];
    let upper: Vec<String> = Status::ALL
        .iter()
        .map(|st| st.as_str().to_uppercase())
        .collect();
    headers.extend(upper.iter().map(String::as_str));
    headers.push("TOTAL");
    let mut rows = Vec::new();
    let row_of = |name: &str, counts: &std::collections::BTreeMap<String, u64>| {
        let mut row = vec![name.to_owned()];
        let mut total = 0;
        for st in Status::ALL {
            let n = counts.get(st.as_str()).copied().unwrap_or(0);
            total += n;
            row.push(n.to_string());
        }
        row.push(total.to_string());
        row
    };
    for (def, counts) in &s.by_definition {
        rows.push(row_of(def, counts));
    }
    rows.push(row_of("(all)", &s.by_status()));
    out.push_str(&table(&headers, &rows));
    out.push('\n');

    let kinds: Vec<Vec<String>> = FindingKind::ALL
        .iter()
        .map(|k| {
            vec![
                k.as_str().to_owned(),
                s.findings.get(k.as_str()).copied().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["FINDING", "COUNT"], &kinds));
    out.push('\n');

    if report.findings.is_empty() {
        out.push_str("Consistent: no findings.\n");
        return out;
    }
    let rows: Vec<Vec<String>> = report
        .findings
        .iter()
        .map(|f| {
            vec![
                f.kind.as_str().to_owned(),
                f.instance.map_or("-".to_owned(), |i| i.to_string()),
                opt(f.definition.as_deref()),
                opt(f.step.as_deref()),
                f.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["KIND", "INSTANCE", "DEFINITION", "STEP", "DETAIL"],
        &rows,
    ));
    out.push_str(&format!(
        "\nInconsistent: {} finding(s).\n",
        report.findings.len()
    ));
    out
}

/// The whole report as one JSON document.
pub fn report_json(report: &Report) -> String {
    let doc = json!({
        "consistent": report.is_consistent(),
        "summary": report.summary,
        "by_status": report.summary.by_status(),
        "findings": report.findings,
    });
    serde_json::to_string_pretty(&doc).expect("a report serializes") + "\n"
}

/// The findings as CSV with a header row.
pub fn report_csv(report: &Report) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["kind", "instance", "definition", "step", "detail"])
        .expect("writing to memory");
    for f in &report.findings {
        w.write_record([
            f.kind.as_str(),
            &f.instance.map(|i| i.to_string()).unwrap_or_default(),
            f.definition.as_deref().unwrap_or(""),
            f.step.as_deref().unwrap_or(""),
            &f.detail,
        ])
        .expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("flushing to memory")).expect("CSV of UTF-8 is UTF-8")
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A page of `GET /v1/sagas` as a table.
pub fn saga_list(page: &Value) -> String {
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                s(&i["id"]),
                format!("{} v{}", s(&i["definition"]), s(&i["version"])),
                s(&i["status"]),
                s(&i["created_at"]),
                s(&i["updated_at"]),
                s(&i["failure"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "DEFINITION",
            "STATUS",
            "CREATED",
            "UPDATED",
            "FAILURE",
        ],
        &rows,
    )
}

/// One line describing an event of the timeline.
fn event_detail(e: &Value) -> String {
    let get = |k: &str| e.get(k).filter(|v| !v.is_null());
    match e["kind"].as_str().unwrap_or("") {
        "started" => format!(
            "{} v{} ({})",
            s(&e["plan"]["name"]),
            s(&e["plan"]["version"]),
            s(&e["plan"]["mode"])
        ),
        "dispatched" | "extended" => format!("deadline {}", s(&e["deadline"])),
        "replied" => {
            let o = &e["outcome"];
            match o.get("reason").or_else(|| o.get("note")) {
                Some(r) if !r.is_null() => format!("{}: {}", s(&o["status"]), s(r)),
                _ => s(&o["status"]),
            }
        }
        "reply_ignored" => format!("{} reply ignored: {}", s(&e["outcome"]), s(&e["reason"])),
        "retry_scheduled" => format!("next attempt at {}", s(&e["at"])),
        "postponed" => format!("breaker open; next try at {}", s(&e["until"])),
        "operator_action" => format!(
            "{} by {}: {}",
            s(&e["action"]),
            s(&e["actor"]),
            s(&e["reason"])
        ),
        "finished" => s(&e["status"]),
        "preparation_failed" => s(&e["error"]),
        "awaiting_signal" => format!("signal {} until {}", s(&e["signal"]), s(&e["until"])),
        "signalled" => format!(
            "signal {} (id {}): {}",
            s(&e["signal"]),
            s(&e["signal_id"]),
            s(&e["data"])
        ),
        "signal_timed_out" => format!("no signal {} in time", s(&e["signal"])),
        "wait_undone" => "a wait has nothing to compensate".to_owned(),
        _ => get("reason").map(s).unwrap_or_default(),
    }
}

/// A step's status as the log says it, whether an operator settled it by hand, and until
/// when a wait step waits for its signal.
fn step_status(step: &Value) -> String {
    let mut status = s(&step["status"]);
    if step["resolved_by_hand"].as_bool() == Some(true) {
        status.push_str(", settled by hand");
    }
    if let Some(until) = step.get("signal_deadline").filter(|v| !v.is_null()) {
        status.push_str(&format!(", waits until {}", s(until)));
    }
    status
}

/// The operations of a transaction's mode, forward first.
fn operations(saga: &Value) -> &'static [Operation] {
    match saga["mode"].as_str() {
        Some("tcc") => &[Operation::Try, Operation::Confirm, Operation::Cancel],
        _ => &[Operation::Action, Operation::Compensate],
    }
}

/// An operation without a barrier row: never received, or refused in a way the participant
/// does not keep (a failed compensate, confirm or cancel is not stored, so that a retry runs it
/// again).
const NO_RECORD: &str = "not applied (no record)";

/// Per step of `participant` in the transaction (`GET /v1/sagas/{id}`): what the log says of
/// it, and what the participant's barrier rows say of each operation of its mode.
pub fn applied(saga: &Value, participant: &str, rows: &[BarrierRow]) -> Value {
    let steps = saga["steps"].as_array().cloned().unwrap_or_default();
    let mine = steps.iter().filter(|st| st["participant"] == participant);
    let items: Vec<Value> = mine
        .map(|st| {
            let name = s(&st["name"]);
            let mut at = serde_json::Map::new();
            for op in operations(saga) {
                let row = rows
                    .iter()
                    .find(|r| r.step == name && r.operation == op.as_str());
                let effect = row.map_or_else(|| NO_RECORD.to_owned(), BarrierRow::effect);
                at.insert(op.as_str().to_owned(), Value::String(effect));
            }
            json!({ "step": name, "log": step_status(st), "participant": at })
        })
        .collect();
    Value::Array(items)
}

/// [`applied`] as a table under a heading.
pub fn applied_table(saga: &Value, participant: &str, rows: &[BarrierRow]) -> String {
    let mut headers = vec!["STEP", "LOG SAYS"];
    let upper: Vec<String> = (operations(saga).iter())
        .map(|op| op.as_str().to_uppercase())
        .collect();
    headers.extend(upper.iter().map(String::as_str));
    let items = applied(saga, participant, rows);
    let rows: Vec<Vec<String>> = (items.as_array().into_iter().flatten())
        .map(|item| {
            let mut row = vec![s(&item["step"]), s(&item["log"])];
            for op in operations(saga) {
                row.push(s(&item["participant"][op.as_str()]));
            }
            row
        })
        .collect();
    let mut out = format!("At participant {participant} (its barrier table):\n");
    if rows.is_empty() {
        out.push_str("no step of this transaction runs there\n");
    } else {
        out.push_str(&table(&headers, &rows));
    }
    out
}

/// What is still in flight (`in_flight` of `GET /v1/sagas/{id}`), and whether a fix by hand
/// is safe now.
pub fn in_flight_lines(f: &Value, waits: &[String]) -> String {
    if f["quiet"].as_bool() == Some(true) {
        return "In flight    nothing in flight: safe to fix by hand\n".to_owned();
    }
    let mut why = Vec::new();
    match f["outbox_rows"].as_u64() {
        Some(0) | None => {}
        Some(n) => why.push(format!(
            "{n} command(s) in the outbox, not yet published: a participant will receive them"
        )),
    }
    for a in f["awaiting_reply"].as_array().into_iter().flatten() {
        why.push(format!(
            "step {}: {} attempt {} awaits its reply until {}{}: the participant may still apply it",
            s(&a["step"]),
            s(&a["operation"]),
            s(&a["attempt"]),
            s(&a["deadline"]),
            if a["in_progress"].as_bool() == Some(true) {
                " (in progress)"
            } else {
                ""
            }
        ));
    }
    let timers = f["timers"].as_array().into_iter().flatten();
    for t in timers.filter(|t| t["can_act"].as_bool() != Some(false)) {
        let attempt = || {
            format!(
                "step {}: {} attempt {}",
                s(&t["step"]),
                s(&t["operation"]),
                s(&t["attempt"])
            )
        };
        let wait = waits.contains(&s(&t["step"]));
        why.push(match s(&t["kind"]).as_str() {
            "deadline" if wait => format!(
                "step {}: the wait for its signal ends at {}",
                s(&t["step"]),
                s(&t["due_at"])
            ),
            "backoff" => format!("{} will be sent at {}", attempt(), s(&t["due_at"])),
            "deadline" => format!(
                "{} times out at {}, and may be sent again",
                attempt(),
                s(&t["due_at"])
            ),
            _ => format!(
                "the transaction's deadline at {} will start compensating it",
                s(&t["due_at"])
            ),
        });
    }
    let mut out = "In flight    NOT safe to fix by hand now: what is in flight may still \
                   change the participant's data or the transaction\n"
        .to_owned();
    for line in why {
        out.push_str(&format!("             - {line}\n"));
    }
    out
}

/// A transaction (`GET /v1/sagas/{id}`) with its timeline (`…/events`).
pub fn saga_detail(saga: &Value, events: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!("Transaction  {}\n", s(&saga["id"])));
    out.push_str(&format!(
        "Definition   {} v{} ({})\n",
        s(&saga["definition"]),
        s(&saga["version"]),
        s(&saga["mode"])
    ));
    out.push_str(&format!("Status       {}\n", s(&saga["status"])));
    if !saga["failure"].is_null() {
        out.push_str(&format!("Failure      {}\n", s(&saga["failure"])));
    }
    out.push_str(&format!("Created      {}\n", s(&saga["created_at"])));
    out.push_str(&format!("Updated      {}\n", s(&saga["updated_at"])));
    out.push_str(&format!("Input        {}\n", saga["input"]));
    let steps = saga["steps"].as_array().cloned().unwrap_or_default();
    if let Some(in_flight) = saga.get("in_flight").filter(|v| v.is_object()) {
        let waits: Vec<String> = (steps.iter())
            .filter(|st| st.get("signal").is_some_and(|v| !v.is_null()))
            .map(|st| s(&st["name"]))
            .collect();
        out.push_str(&in_flight_lines(in_flight, &waits));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|st| {
            let by = match st.get("signal").filter(|v| !v.is_null()) {
                Some(signal) => format!("signal {}", s(signal)),
                None => s(&st["participant"]),
            };
            vec![
                s(&st["name"]),
                by,
                step_status(st),
                s(&st["attempts"]),
                s(&st["last_error"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["STEP", "PARTICIPANT", "STATUS", "ATTEMPTS", "LAST ERROR"],
        &rows,
    ));
    out.push('\n');
    let name = |v: &Value| {
        v.as_u64()
            .and_then(|i| steps.get(i as usize))
            .map_or_else(|| s(v), |st| s(&st["name"]))
    };
    let rows: Vec<Vec<String>> = events
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let step = match e.get("step") {
                Some(v) if !v.is_null() => name(v),
                _ => e.get("step_name").map_or("-".to_owned(), s),
            };
            vec![
                s(&e["seq"]),
                s(&e["logged_at"]),
                s(&e["kind"]),
                step,
                e.get("operation").map_or("-".to_owned(), s),
                e.get("attempt").map_or("-".to_owned(), s),
                event_detail(e),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SEQ",
            "AT",
            "EVENT",
            "STEP",
            "OPERATION",
            "ATTEMPT",
            "DETAIL",
        ],
        &rows,
    ));
    out
}

/// `GET /v1/stuck` as a table: one row per group, with its oldest transaction to `show`.
pub fn stuck_groups(answer: &Value) -> String {
    let groups = answer["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        return "No stuck transactions.\n".to_owned();
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                s(&g["count"]),
                s(&g["definition"]),
                s(&g["step"]),
                s(&g["participant"]),
                s(&g["oldest_updated_at"]),
                s(&g["newest_updated_at"]),
                g["ids"].get(0).map_or("-".to_owned(), s),
                s(&g["reason"]),
            ]
        })
        .collect();
    table(
        &[
            "COUNT",
            "DEFINITION",
            "STEP",
            "PARTICIPANT",
            "OLDEST",
            "NEWEST",
            "OLDEST ID",
            "REASON",
        ],
        &rows,
    )
}

/// `GET /v1/definitions` as a table.
pub fn definitions(defs: &Value) -> String {
    let items = defs["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            let steps: Vec<String> = d["steps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|st| format!("{}@{}", s(&st["name"]), s(&st["participant"])))
                .collect();
            vec![
                s(&d["name"]),
                s(&d["version"]),
                s(&d["mode"]),
                if d["latest"].as_bool() == Some(true) {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                },
                steps.join(" -> "),
            ]
        })
        .collect();
    table(&["NAME", "VERSION", "MODE", "LATEST", "STEPS"], &rows)
}

/// `GET /v1/participants` as a table.
pub fn participants(answer: &Value) -> String {
    let items = answer["participants"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let or_dash = |v: &Value| if v.is_null() { "-".to_owned() } else { s(v) };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            let share = p["failure_share"].as_f64().unwrap_or(0.0);
            vec![
                s(&p["participant"]),
                s(&p["breaker"]),
                or_dash(&p["since"]),
                format!("{:.0}% of {}", share * 100.0, s(&p["attempts"])),
                or_dash(&p["next_probe"]),
                or_dash(&p["rate_limit"]),
            ]
        })
        .collect();
    table(
        &[
            "PARTICIPANT",
            "BREAKER",
            "SINCE",
            "FAILING",
            "NEXT PROBE",
            "RATE LIMIT/S",
        ],
        &rows,
    )
}

/// One definition (`GET /v1/definitions/{name}/versions/{version}`): what it is, its steps,
/// and its document as YAML.
pub fn definition(d: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Definition   {} v{} ({})\n",
        s(&d["name"]),
        s(&d["version"]),
        s(&d["mode"])
    ));
    out.push_str(&format!("Kind         {}\n", s(&d["kind"])));
    let latest = if d["latest"].as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    };
    out.push_str(&format!("Latest       {latest}\n"));
    out.push_str(&format!("Fingerprint  {}\n", s(&d["fingerprint"])));
    if !d["content_hash"].is_null() {
        out.push_str(&format!("Content hash {}\n", s(&d["content_hash"])));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = d["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            vec![
                s(&st["name"]),
                s(&st["participant"]),
                s(&st["timeout_ms"]),
                s(&st["retry"]["max_attempts"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["STEP", "PARTICIPANT", "TIMEOUT MS", "ATTEMPTS"],
        &rows,
    ));
    if let Some(document) = d.get("document").filter(|v| !v.is_null()) {
        out.push_str("\nDocument\n");
        let yaml = serde_norway::to_string(document).unwrap_or_else(|_| document.to_string());
        for line in yaml.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// Phrases as an indented list, one a line.
pub fn bullets(items: &[String]) -> String {
    items.iter().map(|i| format!("  - {i}\n")).collect()
}

/// Longest body shown in a table of dead letters, in characters.
const BODY_SHOWN: usize = 60;

/// `GET /v1/dead-letters` as a table: a body of a line, cut short.
pub fn dead_letters(page: &Value) -> String {
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            let body = s(&d["body"]).replace(['\n', '\r', '\t'], " ");
            let body = if body.chars().count() > BODY_SHOWN {
                body.chars().take(BODY_SHOWN - 1).collect::<String>() + "…"
            } else {
                body
            };
            let body = match d["body_encoding"].as_str() {
                Some("base64") => format!("base64:{body}"),
                _ => body,
            };
            vec![s(&d["id"]), s(&d["queue"]), s(&d["reason"]), body]
        })
        .collect();
    table(&["ID", "QUEUE", "REASON", "BODY"], &rows)
}

/// Pretty JSON with a final newline.
pub fn json(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n"
}
