//! A participant's counters ([`Stats`]) in the Prometheus text format, and a listener that
//! serves them at `/metrics` (`SAGAS_PARTICIPANT_METRICS_BIND` with
//! [`ParticipantConfig::serve`](crate::config::ParticipantConfig::serve)).
//!
//! The counters are the runtime's own atomics, read at each scrape: nothing is recorded twice
//! and a process without the listener pays nothing. hyper serves HTTP/1.1.

use std::convert::Infallible;
use std::fmt::Write;
use std::future::Future;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Stats;

/// An exported counter: its name, its help text, and how it is read.
type Counter = (&'static str, &'static str, fn(&Stats) -> u64);

/// Each exported counter.
const COUNTERS: &[Counter] = &[
    (
        "sagas_participant_commands_processed_total",
        "Commands answered and acked (each element of a command batch counts).",
        Stats::processed,
    ),
    (
        "sagas_participant_commands_rejected_total",
        "Messages dead-lettered: malformed, wrong protocol version, no reply_to, not a batch.",
        Stats::rejected,
    ),
    (
        "sagas_participant_reply_publish_failures_total",
        "Replies that could not be published (their commands were requeued).",
        Stats::publish_failures,
    ),
    (
        "sagas_participant_unroutable_replies_total",
        "Replies the broker could not route to their reply_to queue.",
        Stats::unroutable_replies,
    ),
    (
        "sagas_participant_handler_timeouts_total",
        "Commands answered retry because they exceeded the handler timeout.",
        Stats::timed_out,
    ),
    (
        "sagas_participant_batches_total",
        "Database transactions that committed several commands at once.",
        Stats::batches,
    ),
    (
        "sagas_participant_command_batches_total",
        "Command batches received (messages of several commands).",
        Stats::command_batches,
    ),
    (
        "sagas_participant_batch_fallbacks_total",
        "Batches rolled back whose commands then ran one by one.",
        Stats::batch_fallbacks,
    ),
    (
        "sagas_participant_batch_reruns_total",
        "Batches run again with savepoints after a handler did not succeed.",
        Stats::batch_reruns,
    ),
    (
        "sagas_participant_database_waits_total",
        "Times a command found the database unreachable and waited to run again.",
        Stats::database_waits,
    ),
    (
        "sagas_participant_reconnects_total",
        "Broker sessions started after the first (reconnections).",
        Stats::reconnects,
    ),
];

/// The names of the counters [`render`] writes.
pub fn names() -> impl Iterator<Item = &'static str> {
    COUNTERS.iter().map(|(name, _, _)| *name)
}

/// `stats` of the participant `participant` in the Prometheus text format (version 0.0.4),
/// each counter labelled with the participant's name.
pub fn render(participant: &str, stats: &Stats) -> String {
    let label = participant.replace('\\', "\\\\").replace('"', "\\\"");
    let mut text = String::new();
    for (name, help, read) in COUNTERS {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} counter");
        let _ = writeln!(text, "{name}{{participant=\"{label}\"}} {}", read(stats));
    }
    text
}

/// Serves `GET /metrics` (the counters of `stats`) on `listener` until `shutdown`; any other
/// path is 404. Connections that fail are dropped quietly.
pub async fn serve_metrics(
    listener: TcpListener,
    participant: String,
    stats: Stats,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (participant, stats) = (participant.clone(), stats.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let answer = answer(&request, &participant, &stats);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(request: &Request<Incoming>, participant: &str, stats: &Stats) -> Response<Full<Bytes>> {
    let (status, kind, body) = if request.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(participant, stats),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn every_counter_is_rendered_with_its_type_and_the_participant_label() {
        let stats = Stats::default();
        stats.0.processed.fetch_add(7, Ordering::Relaxed);
        stats.0.reconnects.fetch_add(2, Ordering::Relaxed);
        let text = render("acc\"ounts", &stats);
        assert!(text.contains(
            "sagas_participant_commands_processed_total{participant=\"acc\\\"ounts\"} 7\n"
        ));
        assert!(
            text.contains("sagas_participant_reconnects_total{participant=\"acc\\\"ounts\"} 2\n")
        );
        for name in names() {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
            assert!(name.ends_with("_total"), "{name}");
        }
        assert_eq!(names().count(), COUNTERS.len());
    }
}
