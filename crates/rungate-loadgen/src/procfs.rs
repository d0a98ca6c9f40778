//! Memory and CPU of a process (the gateway under test, or the load
//! generator itself) from `/proc/PID/status` and `/proc/PID/stat`.
//! Linux only; elsewhere every read fails and the report leaves the
//! figures out.

use std::io;

use tokio::time::Instant;

/// One look at a process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Resident set, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set so far, KiB (`VmHWM`).
    pub peak_kib: u64,
    pub threads: u64,
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
    pub at: Instant,
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads `/proc/{pid}` (`pid` = "self" for this process).
pub(crate) fn sample(pid: &str) -> io::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc format");
    // The command name (field 2) is in parentheses and may hold spaces;
    // fields from 3 on follow the last ')'. utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
    };
    let cpu_ticks = ticks(11)? + ticks(12)?;
    Ok(Sample {
        rss_kib: status_kib(&status, "VmRSS:").ok_or_else(bad)?,
        peak_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        threads: status_kib(&status, "Threads:").unwrap_or(0),
        cpu_secs: cpu_ticks as f64 / clock_ticks_per_sec(),
        at: Instant::now(),
    })
}

/// CPU used between two samples, in percent of one core.
pub(crate) fn cpu_percent(from: &Sample, to: &Sample) -> f64 {
    let wall = to.at.duration_since(from.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (to.cpu_secs - from.cpu_secs) / wall * 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let s = super::sample("self").expect("/proc/self");
        assert!(s.rss_kib > 0);
        assert!(s.threads >= 1);
    }
}
