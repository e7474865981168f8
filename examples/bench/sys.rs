//! CPU and memory accounting from `/proc` (Linux), without libc.
//!
//! CPU time is counted for three groups: this process (the orchestrator, the participants and
//! the load driver all run in it), every PostgreSQL process (backends that exited during the
//! measurement are included through the postmaster's `cutime`/`cstime`), and RabbitMQ's
//! `beam.smp`. The machine's busy time comes from `/proc/stat`.

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

/// CPU seconds used so far, per group.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// This process (all threads).
    pub bench: f64,
    /// All PostgreSQL processes, including reaped backends.
    pub postgres: f64,
    /// RabbitMQ (`beam.smp` and its helpers).
    pub rabbitmq: f64,
    /// Busy time of the whole machine (all cores, everything but idle and iowait).
    pub machine_busy: f64,
    /// Wall-clock time of the whole machine times its cores, as `/proc/stat` counts it.
    pub machine_total: f64,
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub fn take() -> CpuSnapshot {
        let tck = clock_ticks();
        let mut snap = CpuSnapshot::default();
        if let Some((_, _, own, _)) = proc_stat("self") {
            snap.bench = own as f64 / tck;
        }
        let mut pg_ticks = 0u64;
        let mut rabbit_ticks = 0u64;
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
                        // The postmaster (whose parent is not postgres) reaps the backends.
                        let parent = proc_stat(&ppid.to_string()).map(|p| p.0);
                        if !matches!(parent.as_deref(), Some("postgres" | "postmaster")) {
                            pg_ticks += children;
                        }
                    }
                    "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => {
                        rabbit_ticks += own + children;
                    }
                    _ => {}
                }
            }
        }
        snap.postgres = pg_ticks as f64 / tck;
        snap.rabbitmq = rabbit_ticks as f64 / tck;
        if let Ok(stat) = fs::read_to_string("/proc/stat")
            && let Some(line) = stat.lines().find(|l| l.starts_with("cpu "))
        {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest is inside user)
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            snap.machine_total = total as f64 / tck;
            snap.machine_busy = (total - idle) as f64 / tck;
        }
        snap
    }

    /// The CPU seconds used between `self` and `later`.
    pub fn until(&self, later: &CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            bench: later.bench - self.bench,
            postgres: later.postgres - self.postgres,
            rabbitmq: later.rabbitmq - self.rabbitmq,
            machine_busy: later.machine_busy - self.machine_busy,
            machine_total: later.machine_total - self.machine_total,
        }
    }
}

fn status_kb(key: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident memory of this process since start or the last [`reset_peak_rss`], in MiB.
pub fn peak_rss_mib() -> f64 {
    status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0
}

/// Resident memory of this process now, in MiB.
pub fn rss_mib() -> f64 {
    status_kb("VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5); false if not allowed.
pub fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Number of online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
