//! `--topology processes`: the path users take. Orchestrator processes built as `sagad` builds
//! its own, one process per participant, and this process as the clients, which start every
//! saga with `?wait` and take its terminal answer as its end.

use anyhow::Result;
use sagas::orchestrator::engine::metric;
use uuid::Uuid;

use crate::clients;
use crate::fleet::Fleet;
use crate::participants;
use crate::prefill;
use crate::roles::ParticipantReport;
use crate::run::{self, Baseline, Counted, Measured, Memory, Place, Starter, StateCache};
use crate::scrape::Scrape;
use crate::sys::{self, CpuSnapshot};
use crate::{Args, Workload};

/// Runs one workload on processes of its own and stops them.
pub async fn run(args: &Args, place: &Place<'_>, workload: Workload) -> Result<Measured> {
    let names = participants::names(workload, args.steps);
    let definition = participants::definition_name(workload, args.steps);
    run::prepare(place, &names).await?;
    let mut fleet = Fleet::start(args, place, workload)?;
    let http = clients::http_client(args.concurrency)?;
    fleet.ready(place, &http).await?;

    // The history, before anything is counted, through the first orchestrator.
    let (prefill, boundary) = if args.prefill_events > 0 {
        let starter = Starter::Http {
            client: http.clone(),
            url: fleet.bases()[0].clone(),
        };
        let p = prefill::prefill(
            args,
            &starter,
            workload,
            &definition,
            place.orch,
            place.part,
        )
        .await?;
        (Some(p.report), p.boundary)
    } else {
        (None, Uuid::nil())
    };
    let baseline = Baseline::take(place).await?;
    let scrape_0 = fleet.scrape(&http).await?;
    fleet.reset_peak_rss();
    sys::reset_peak_rss("self");
    let idle_rss = sys::rss_mib("self");
    let children = fleet.children();
    let cpu_0 = CpuSnapshot::take_with(&children);

    let driven = clients::drive(args, workload, &definition, fleet.bases(), &http).await?;

    let cpu_1 = CpuSnapshot::take_with(&children);
    let (orchestrators_rss, participants_rss) = fleet.peak_rss_mib();
    let memory = Memory {
        peak_rss_mib: sys::peak_rss_mib("self"),
        idle_rss_mib: idle_rss,
        orchestrators: orchestrators_rss,
        participants: participants_rss,
    };
    let scrape_1 = fleet.scrape(&http).await?;
    let reports = fleet.stop().await;
    Ok(Measured {
        baseline,
        boundary,
        prefill,
        driven,
        counted: counted(&scrape_0, &scrape_1, &reports),
        memory,
        cpu_0,
        cpu_1,
        orchestrators: args.orchestrators,
    })
}

/// The orchestrators' counters between two scrapes, and the participants' reports.
fn counted(before: &[Scrape], after: &[Scrape], reports: &[ParticipantReport]) -> Counted {
    let delta = |read: &dyn Fn(&Scrape) -> u64| -> Vec<u64> {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| read(a).saturating_sub(read(b)))
            .collect()
    };
    let sum = |read: &dyn Fn(&Scrape) -> u64| delta(read).iter().sum();
    let cache =
        |result: &'static str| delta(&|s| s.labelled(metric::STATE_CACHE, "result", result));
    let report_sum = |read: fn(&ParticipantReport) -> u64| reports.iter().map(read).sum();
    Counted {
        timers_fired: sum(&|s| s.counter(metric::TIMERS)),
        relayed: sum(&|s| s.counter(metric::RELAYED)),
        dead_lettered: sum(&|s| s.counter(metric::DEAD_LETTERED)),
        pruned: sum(&|s| s.counter(metric::PRUNED)),
        wire_commands: sum(&|s| s.labelled(metric::AMQP_MESSAGES, "kind", "command")),
        wire_replies: sum(&|s| s.labelled(metric::AMQP_MESSAGES, "kind", "reply")),
        participant_batches: report_sum(|r| r.batches),
        participant_batch_reruns: report_sum(|r| r.batch_reruns),
        participant_batch_fallbacks: report_sum(|r| r.batch_fallbacks),
        state_cache: cache("hit")
            .into_iter()
            .zip(cache("stale"))
            .zip(cache("skipped"))
            .map(|((hits, stale), skipped)| StateCache {
                hits,
                stale,
                skipped,
            })
            .collect(),
        ..Counted::default()
    }
}
