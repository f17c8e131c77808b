//! Fault trace lines as `daxfs trace` prints them: in the shape of the
//! kernel's trace buffer (`comm-pid [cpu] seconds: event`), so that what
//! reads `/sys/kernel/tracing/trace` for `fs_dax` events reads these too.

use std::fmt::Display;
use std::sync::OnceLock;

/// `event` as a line of this process's trace: its name and pid, the CPU
/// it runs on, and the monotonic time.
pub fn line(event: impl Display) -> String {
    static COMM: OnceLock<String> = OnceLock::new();
    let comm = COMM.get_or_init(|| {
        std::fs::read_to_string("/proc/self/comm")
            .map(|c| c.trim_end().to_string())
            .unwrap_or_else(|_| "?".into())
    });
    // SAFETY: sched_getcpu has no arguments; -1 is an error.
    let cpu = unsafe { libc::sched_getcpu() }.max(0);
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    let now = (t.tv_sec, t.tv_nsec / 1000);
    format!(
        "{comm:>16}-{:<7} [{cpu:03}] {:>5}.{:06}: {event}",
        std::process::id(),
        now.0,
        now.1
    )
}

/// The event of a trace line (what follows the time stamp).
pub fn event_of(line: &str) -> &str {
    line.split_once("]")
        .and_then(|(_, rest)| rest.split_once(": "))
        .map_or(line, |(_, event)| event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_shaped_as_the_kernels_trace() {
        let l = line("dax_pmd_fault_done: ino 0x5 shared READ NOPAGE");
        let pid = format!("-{} ", std::process::id());
        assert!(l.contains(&pid), "{l}");
        let (_, rest) = l.split_once('[').unwrap();
        assert_eq!(rest.chars().nth(3), Some(']'), "{l}");
        assert_eq!(
            event_of(&l),
            "dax_pmd_fault_done: ino 0x5 shared READ NOPAGE"
        );
    }
}
