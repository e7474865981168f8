//! The text report (`--json` prints the same as one document).

use crate::fleet::Settings;
use crate::run::{PARTICIPANT_STATEMENTS_PER_COMMAND, WorkloadResult};
use crate::{Layout, Via};

/// The settings of the processes, once per run.
pub fn print_settings(s: &Settings) {
    let json = |v: serde_json::Result<String>| v.unwrap_or_default();
    println!(
        "  orchestrator settings {}",
        json(serde_json::to_string(&s.orchestrator))
    );
    println!(
        "  participant settings  {}",
        json(serde_json::to_string(&s.participant))
    );
}

pub fn print_text(r: &WorkloadResult) {
    let via = match r.via {
        Via::Http => "HTTP",
        Via::Engine => "Engine::start",
    };
    let rate = r
        .rate
        .map(|x| format!(", paced at {x:.0}/s"))
        .unwrap_or_default();
    println!();
    let mut extra = String::new();
    if r.start_calls < r.concurrency {
        extra += &format!(", at most {} start calls at once", r.start_calls);
    }
    if let Some(t) = r.step_timeout_secs {
        extra += &format!(", step timeout {t} s");
    }
    let processes = r.topology == Layout::Processes;
    if processes {
        extra += &format!(
            ", {} orchestrator process(es), one process per participant",
            r.orchestrators
        );
    }
    println!(
        "{} — {} sagas, {} steps, {} in flight, via {via}{rate}{extra}",
        r.workload.as_str(),
        r.sagas,
        r.steps,
        r.concurrency
    );
    if let Some(p) = &r.prefill {
        let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
        println!(
            "  prefill      {} events of {} finished sagas in {:.0} s (seeds {:.0} s, clones {:.0} s, VACUUM ANALYZE {:.0} s, CHECKPOINT {:.0} s); databases {:.0} MiB orchestrator, {:.0} MiB participants",
            p.events,
            p.instances,
            p.total_secs,
            p.seed_secs,
            p.clone_secs,
            p.vacuum_secs,
            p.checkpoint_secs,
            mib(p.orchestrator_db_bytes),
            mib(p.participant_db_bytes)
        );
        for t in &p.tables {
            println!(
                "               {}.{}: ≈ {} rows, {:.0} MiB table + {:.0} MiB indexes",
                t.database,
                t.table,
                t.rows,
                mib(t.table_bytes),
                mib(t.index_bytes)
            );
        }
    }
    if r.status != "ok" {
        println!("  FAILURE");
        for f in &r.failures {
            println!("    {f}");
        }
        println!(
            "  lost {}, duplicated {}, inconsistent {}, start errors {}; at most {} in flight, peak RSS {:.0} MiB",
            r.lost, r.duplicated, r.inconsistent, r.start_errors, r.max_in_flight, r.peak_rss_mib
        );
        return;
    }
    let f = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    println!(
        "  throughput   {} sagas/s ({} completed, {} compensated in {:.1} s; starts issued at {:.0}/s)",
        f(r.sagas_per_s),
        r.completed,
        r.compensated,
        r.seconds,
        r.start_rate
    );
    if processes {
        println!(
            "  latency      p50 {} ms, p95 {} ms, p99 {} ms, max {} ms (at the client: request sent -> terminal answer); created -> terminal p50 {} ms, p99 {} ms",
            f(r.p50_ms),
            f(r.p95_ms),
            f(r.p99_ms),
            f(r.max_ms),
            f(r.created_to_terminal_p50_ms),
            f(r.created_to_terminal_p99_ms)
        );
    } else {
        println!(
            "  latency      p50 {} ms, p95 {} ms, p99 {} ms, max {} ms (created -> terminal); start call p50 {:.1} ms, p99 {:.1} ms",
            f(r.p50_ms),
            f(r.p95_ms),
            f(r.p99_ms),
            f(r.max_ms),
            r.start_p50_ms,
            r.start_p99_ms
        );
    }
    println!(
        "  per saga     {:.2} AMQP messages ({:.2} commands + {:.2} replies; through the broker {:.2} + {:.2} messages), {:.2} DB transactions ({:.2} orchestrator + {:.2} participants), {:.0} WAL bytes ({:.2} full-page images), {:.2} WAL syncs",
        r.messages_per_saga,
        r.commands_per_saga,
        r.replies_per_saga,
        r.wire_commands_per_saga,
        r.wire_replies_per_saga,
        r.db_xacts_per_saga,
        r.orchestrator_xacts_per_saga,
        r.participant_xacts_per_saga,
        r.wal_bytes_per_saga,
        r.wal_fpi_per_saga,
        r.wal_syncs_per_saga
    );
    let ms = |x: Option<f64>| x.unwrap_or_default();
    if processes {
        println!(
            "  CPU per saga {:.2} ms orchestrators, {:.2} ms participants, {:.2} ms clients, {:.2} ms PostgreSQL, {:.2} ms RabbitMQ: {:.2} ms all together; {:.2} ms other processes; machine busy {:.0}%",
            ms(r.cpu_ms_per_saga_orchestrators),
            ms(r.cpu_ms_per_saga_participants),
            r.cpu_ms_per_saga_bench,
            r.cpu_ms_per_saga_postgres,
            r.cpu_ms_per_saga_rabbitmq,
            r.cpu_ms_per_saga_all,
            r.cpu_ms_per_saga_other,
            r.machine_utilisation * 100.0
        );
    } else {
        println!(
            "  CPU per saga {:.2} ms this process, {:.2} ms PostgreSQL, {:.2} ms RabbitMQ, {:.2} ms other processes; machine busy {:.0}%",
            r.cpu_ms_per_saga_bench,
            r.cpu_ms_per_saga_postgres,
            r.cpu_ms_per_saga_rabbitmq,
            r.cpu_ms_per_saga_other,
            r.machine_utilisation * 100.0
        );
    }
    if processes {
        println!(
            "  switches     per saga {:.0} orchestrators, {:.0} participants, {:.0} clients, {:.0} PostgreSQL, {:.0} RabbitMQ; {:.0} on the whole machine",
            ms(r.switches_per_saga_orchestrators),
            ms(r.switches_per_saga_participants),
            r.switches_per_saga_bench,
            r.switches_per_saga_postgres,
            r.switches_per_saga_rabbitmq,
            r.switches_per_saga_machine
        );
    } else {
        println!(
            "  switches     per saga {:.0} this process, {:.0} PostgreSQL, {:.0} RabbitMQ; {:.0} on the whole machine",
            r.switches_per_saga_bench,
            r.switches_per_saga_postgres,
            r.switches_per_saga_rabbitmq,
            r.switches_per_saga_machine
        );
    }
    if r.cpu_ms_per_saga_other > 0.1 * r.cpu_ms_per_saga_machine {
        println!(
            "  WARNING      other processes used {:.0}% of the busy CPU time: the machine was not quiet",
            100.0 * r.cpu_ms_per_saga_other / r.cpu_ms_per_saga_machine.max(1e-9)
        );
    }
    if processes {
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  memory       peak RSS {} MiB (each orchestrator), {} MiB (each participant), {:.0} MiB (clients, {:.0} MiB idle before the first start)",
            list(&r.peak_rss_mib_orchestrators),
            list(&r.peak_rss_mib_participants),
            r.peak_rss_mib,
            r.idle_rss_mib
        );
        println!(
            "  in flight    at most {} requests awaiting their answer at once",
            r.max_in_flight
        );
    } else {
        println!(
            "  memory       peak RSS {:.0} MiB (whole process: orchestrator + participants + driver), {:.0} MiB idle before the first start",
            r.peak_rss_mib, r.idle_rss_mib
        );
        println!(
            "  in flight    at most {} instances open at once ({:.0} MiB RSS when first reached)",
            r.max_in_flight,
            ms(r.rss_at_max_in_flight_mib)
        );
    }
    if let Some(floor) = r.serial_floor_ms {
        let times = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "  floor        {floor:.1} ms: {:.0} commits and {:.0} messages one after the other at the ceilings' speeds; p50 {} and p99 {} times that",
            1.0 + r.messages_per_saga,
            r.messages_per_saga,
            times(r.p50_over_floor),
            times(r.p99_over_floor)
        );
    }
    if let Some(chain) = r.chain_floor_ms {
        println!(
            "  chain        {chain:.1} ms: the floor's commits on a bare connection, {:.0} statements per command, its messages; p50 {} times that",
            PARTICIPANT_STATEMENTS_PER_COMMAND,
            r.p50_over_chain
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "  efficiency   {} of the AMQP ceiling, {} of the PostgreSQL ceiling",
        r.efficiency
            .map(|e| format!("{:.0}%", e * 100.0))
            .unwrap_or_else(|| "-".into()),
        r.db_efficiency
            .map(|e| format!("{:.0}%", e * 100.0))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  checks       lost 0, duplicated 0, inconsistent 0; outbox left {}, timers fired {}, relayed {}, dead-lettered {}",
        r.outbox_left, r.timers_fired, r.relayed, r.dead_lettered
    );
    if r.pruned > 0 {
        println!(
            "  retention    {} finished sagas of the history pruned during the timed part",
            r.pruned
        );
    }
    println!(
        "  participants {} barrier batches, {} run again with savepoints, {} fell back to one by one",
        r.participant_batches, r.participant_batch_reruns, r.participant_batch_fallbacks
    );
    let share = |x: Option<f64>| {
        x.map(|v| format!("{:.1}%", v * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "  orchestrator {} replies decided on cached states (one statement), {} found them stale ({} stale), {} decided on stored states while guessing paused",
        r.cached_replies,
        r.stale_replies,
        share(r.stale_share),
        r.skipped_replies
    );
    if r.state_cache_by_orchestrator.len() > 1 {
        for (i, c) in r.state_cache_by_orchestrator.iter().enumerate() {
            println!(
                "               orchestrator {}: {} cached, {} stale ({} stale), {} paused",
                i + 1,
                c.hits,
                c.stale,
                share(c.stale_share()),
                c.skipped
            );
        }
    }
    if !processes {
        println!(
            "  driver       {} completion polls, {:.2} ms round trip, {:.3} ms execution in PostgreSQL",
            r.completion_polls, r.completion_poll_ms, r.completion_poll_server_ms
        );
    }
}
