//! CPU and memory accounting from `/proc` (Linux), without libc.
//!
//! CPU time is counted per group: this process (in process, the orchestrator, the participants
//! and the load driver all run in it; with `--topology processes`, the clients), the
//! orchestrator and participant processes it started, every PostgreSQL process (backends that
//! exited during the measurement are included through the postmaster's `cutime`/`cstime`),
//! and RabbitMQ's `beam.smp`. The machine's busy time comes from `/proc/stat`.
//!
//! Context switches are counted alongside, per group, from every thread's
//! `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` (`/proc/{pid}/task/*/status`;
//! threads and backends that exited during the run are not counted), and for the whole machine
//! from `/proc/stat`'s `ctxt`. On a lone saga they count the hand-offs between threads and
//! processes that its latency is made of, and they vary far less between runs than times do.

use std::fs;

/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK`; 100 on every Linux we know of).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// `(comm, ppid, utime + stime, cutime + cstime)` in ticks, from `/proc/{pid}/stat`.
fn proc_stat(pid: &str) -> Option<(String, u64, u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may contain spaces; everything after the last ')' is fields 3..
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ppid = field(4)?;
    let own = field(14)? + field(15)?;
    let children = field(16)? + field(17)?;
    Some((comm, ppid, own, children))
}

/// Context switches of every thread of `pid` so far (0 for a process that is gone).
fn task_switches(pid: &str) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:")
                        || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// One figure per group (see the module's docs): CPU seconds, or context switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Groups {
    /// This process (all threads).
    pub bench: f64,
    /// The orchestrator processes this one started (sum).
    pub orchestrators: f64,
    /// The participant processes this one started (sum).
    pub participants: f64,
    /// All PostgreSQL processes (CPU: including reaped backends).
    pub postgres: f64,
    /// RabbitMQ (`beam.smp` and its helpers).
    pub rabbitmq: f64,
    /// The whole machine: its busy time (everything but idle and iowait, all cores), or
    /// every thread's switches (`/proc/stat`'s `ctxt`).
    pub machine: f64,
}

impl Groups {
    /// What was added between `self` and `later`.
    fn until(&self, later: &Groups) -> Groups {
        Groups {
            bench: later.bench - self.bench,
            orchestrators: later.orchestrators - self.orchestrators,
            participants: later.participants - self.participants,
            postgres: later.postgres - self.postgres,
            rabbitmq: later.rabbitmq - self.rabbitmq,
            machine: later.machine - self.machine,
        }
    }

    /// The groups measured together (this process, its children, PostgreSQL and RabbitMQ).
    pub fn ours(&self) -> f64 {
        self.bench + self.orchestrators + self.participants + self.postgres + self.rabbitmq
    }
}

/// The processes this one started, by group (`--topology processes`).
#[derive(Debug, Clone, Default)]
pub struct Children {
    pub orchestrators: Vec<u32>,
    pub participants: Vec<u32>,
}

/// CPU seconds used and context switches so far, per group.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// CPU seconds (`machine`: the machine's busy time).
    pub cpu: Groups,
    /// Wall-clock time of the whole machine times its cores, as `/proc/stat` counts it.
    pub machine_total: f64,
    /// Context switches.
    pub switches: Groups,
}

impl CpuSnapshot {
    /// Reads the counters now, with no processes of this one's.
    pub fn take() -> CpuSnapshot {
        CpuSnapshot::take_with(&Children::default())
    }

    /// Reads the counters now, `children` included (a process that is gone counts 0).
    pub fn take_with(children: &Children) -> CpuSnapshot {
        let tck = clock_ticks();
        let own = |pid: &str| proc_stat(pid).map_or(0, |(_, _, own, _)| own);
        let sum = |pids: &[u32]| pids.iter().map(|p| own(&p.to_string())).sum::<u64>() as f64 / tck;
        let switched = |pids: &[u32]| {
            pids.iter()
                .map(|p| task_switches(&p.to_string()))
                .sum::<u64>() as f64
        };
        let mut snap = CpuSnapshot::default();
        snap.cpu.bench = own("self") as f64 / tck;
        snap.cpu.orchestrators = sum(&children.orchestrators);
        snap.cpu.participants = sum(&children.participants);
        snap.switches.bench = task_switches("self") as f64;
        snap.switches.orchestrators = switched(&children.orchestrators);
        snap.switches.participants = switched(&children.participants);
        let mut pg_ticks = 0u64;
        let mut rabbit_ticks = 0u64;
        let (mut pg_switches, mut rabbit_switches) = (0u64, 0u64);
        if let Ok(entries) = fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                let Some((comm, ppid, own, children)) = proc_stat(pid) else {
                    continue;
                };
                match comm.as_str() {
                    "postgres" | "postmaster" => {
                        pg_ticks += own;
                        pg_switches += task_switches(pid);
                        // The postmaster (whose parent is not postgres) reaps the backends.
                        let parent = proc_stat(&ppid.to_string()).map(|p| p.0);
                        if !matches!(parent.as_deref(), Some("postgres" | "postmaster")) {
                            pg_ticks += children;
                        }
                    }
                    "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => {
                        rabbit_ticks += own + children;
                        rabbit_switches += task_switches(pid);
                    }
                    _ => {}
                }
            }
        }
        snap.cpu.postgres = pg_ticks as f64 / tck;
        snap.cpu.rabbitmq = rabbit_ticks as f64 / tck;
        snap.switches.postgres = pg_switches as f64;
        snap.switches.rabbitmq = rabbit_switches as f64;
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        if let Some(ctxt) = stat
            .lines()
            .find_map(|l| l.strip_prefix("ctxt "))
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            snap.switches.machine = ctxt as f64;
        }
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest is inside user)
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            snap.machine_total = total as f64 / tck;
            snap.cpu.machine = (total - idle) as f64 / tck;
        }
        snap
    }

    /// What was used between `self` and `later`.
    pub fn until(&self, later: &CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            cpu: self.cpu.until(&later.cpu),
            machine_total: later.machine_total - self.machine_total,
            switches: self.switches.until(&later.switches),
        }
    }
}

/// A process: this one (`"self"`) or one of its children (its pid).
pub type Pid<'a> = &'a str;

fn status_mib(pid: Pid, key: &str) -> f64 {
    let kb = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });
    kb.unwrap_or(0) as f64 / 1024.0
}

/// Peak resident memory of `pid` since it started or the last [`reset_peak_rss`], in MiB.
pub fn peak_rss_mib(pid: Pid) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident memory of `pid` now, in MiB.
pub fn rss_mib(pid: Pid) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// Resets the peak RSS of `pid` to its current RSS (Linux `clear_refs` 5); false if not allowed.
pub fn reset_peak_rss(pid: Pid) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Number of online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
