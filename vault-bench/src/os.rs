//! CPU time from the kernel's own accounting (`/proc`), so the figures
//! count every thread of a process, including threads that have exited.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`. Linux
/// reports them in USER_HZ, which is 100 on every mainstream build.
const USER_HZ: u64 = 100;

/// User plus system CPU time of process `pid`, all threads, live and
/// exited (10 ms resolution).
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing parenthesis. utime and stime are
    // fields 14 and 15, so the 12th and 13th after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || -> Result<u64> {
        fields
            .next()
            .ok_or_else(|| anyhow!("{path}: too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("{path}: CPU time field"))
    };
    let ticks = tick()? + tick()?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// CPU time of several processes, added up.
pub fn processes_cpu(pids: &[u32]) -> Result<Duration> {
    pids.iter().map(|p| process_cpu(*p)).sum()
}

/// CPU time of the calling thread, in nanoseconds (`schedstat`'s time on
/// CPU). The kernel brings a running thread's figure up to date only at
/// scheduler events, so the thread yields first.
pub fn thread_cpu() -> Result<Duration> {
    std::thread::yield_now();
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    let ns = text
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("empty schedstat"))?
        .parse::<u64>()
        .context("schedstat")?;
    Ok(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let before_thread = thread_cpu().expect("thread cpu");
        let before_process = process_cpu(std::process::id()).expect("process cpu");
        // Spin for at least 50 ms of CPU.
        let mut x = 0u64;
        while thread_cpu().expect("thread cpu") - before_thread < Duration::from_millis(50) {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let process = process_cpu(std::process::id()).expect("process cpu") - before_process;
        // The process figure has a 10 ms resolution.
        assert!(process >= Duration::from_millis(30), "{process:?}");
    }
}
