//! CPU time and memory of processes, from `/proc`.

use std::fs;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};

/// CPU seconds (user + system, all threads) the process has used so far.
///
/// # Errors
/// When `/proc/<pid>/stat` cannot be read or parsed (the process is gone).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5): utime is field 14 and stime field 15; `rest` starts at field 3.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("{path}: field {index} missing in {stat:?}"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / clock_ticks() as f64)
}

/// Busy CPU seconds of the whole machine so far, all CPUs together (user, nice, system,
/// irq, softirq; idle, iowait and steal excluded).
///
/// # Errors
/// When `/proc/stat` cannot be read or parsed.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // proc(5): user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|i| values.get(*i).copied().unwrap_or(0))
        .sum();
    Ok(busy as f64 / clock_ticks() as f64)
}

/// A `kB` field of `/proc/<pid>/status` such as `VmRSS` or `VmHWM`, in KiB.
///
/// # Errors
/// When the file cannot be read or has no such field.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {field}"))
}

/// Resident memory now (`VmRSS`) in MiB.
///
/// # Errors
/// As [`status_kib`].
pub fn rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmRSS")? as f64 / 1024.0)
}

/// Peak resident memory so far (`VmHWM`) in MiB.
///
/// # Errors
/// As [`status_kib`].
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmHWM")? as f64 / 1024.0)
}

/// Clock ticks per second for `/proc` times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// CPU used by some processes, and by the whole machine, over a stretch of time.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<u32>,
    processes_start: f64,
    machine_start: f64,
    start: Instant,
}

/// What a [`CpuMeter`] saw.
#[derive(Debug, Clone, Copy)]
pub struct CpuUsage {
    /// CPU seconds of the metered processes.
    pub processes_s: f64,
    /// Busy CPU seconds of the whole machine.
    pub machine_s: f64,
    /// Wall-clock seconds.
    pub wall_s: f64,
}

impl CpuUsage {
    /// Cores the metered processes kept busy on average (1.0 = one core).
    pub fn process_cores(&self) -> f64 {
        self.processes_s / self.wall_s.max(1e-9)
    }
}

impl CpuMeter {
    /// Starts metering `pids` (and the machine).
    ///
    /// # Errors
    /// When a process is gone or `/proc` cannot be read.
    pub fn start(pids: &[u32]) -> Result<Self> {
        Ok(Self {
            pids: pids.to_vec(),
            processes_start: sum_cpu(pids)?,
            machine_start: machine_busy_seconds()?,
            start: Instant::now(),
        })
    }

    /// What was used since [`CpuMeter::start`].
    ///
    /// # Errors
    /// When a process is gone or `/proc` cannot be read.
    pub fn read(&self) -> Result<CpuUsage> {
        Ok(CpuUsage {
            processes_s: sum_cpu(&self.pids)? - self.processes_start,
            machine_s: machine_busy_seconds()? - self.machine_start,
            wall_s: self.start.elapsed().as_secs_f64(),
        })
    }
}

fn sum_cpu(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(std::hint::black_box(x) != 1);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(rss_mib(pid).unwrap() > 0.0);
        assert!(peak_rss_mib(pid).unwrap() >= rss_mib(pid).unwrap() - 1.0);
        assert!(machine_busy_seconds().unwrap() > 0.0);
    }
}
