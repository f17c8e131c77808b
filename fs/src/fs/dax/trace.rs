//! The fault trace: one event per DAX fault, in the shape of the kernel's
//! `fs_dax` tracepoints (`dax_pmd_fault_done`, `dax_pte_fault_done`), for
//! whoever listens ([`DaxCounters::set_trace`](super::DaxCounters::set_trace)).
//! ndctl's dax.sh counts `dax_pmd_fault_done` events with result NOPAGE as
//! its evidence of PMD faults; this is the same evidence. Off, it costs a
//! fault one relaxed load.
//!
//! The sink runs in the faulting thread, inside the fault (which may be a
//! `SIGSEGV` handler's), with the fault's locks held: it must not touch a
//! DAX mapping or call into the filesystem.

use super::Fallback;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Where fault events go.
pub type TraceSink = Arc<dyn Fn(&FaultEvent) + Send + Sync>;

/// Which fault: a 2 MiB (PMD) or a 4 KiB (PTE) one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSize {
    Pmd,
    Pte,
}

/// How a fault ended, as the kernel's `VM_FAULT_*` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultResult {
    /// Mapped (`VM_FAULT_NOPAGE`).
    NoPage,
    /// A PMD fault fell back to PTE faults, for this reason.
    Fallback(Fallback),
    /// The access raises `SIGBUS` (past the end of the file).
    Sigbus,
}

/// One DAX fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    pub size: FaultSize,
    pub ino: u64,
    pub shared: bool,
    pub write: bool,
    /// The faulting address (for a PMD fault, of its 2 MiB).
    pub address: u64,
    /// The mapping's first and last-plus-one address.
    pub vm_start: u64,
    pub vm_end: u64,
    /// The file page faulted.
    pub pgoff: u64,
    /// The file's last page.
    pub max_pgoff: u64,
    pub result: FaultResult,
}

impl Fallback {
    /// Why, in words.
    pub fn reason(self) -> &'static str {
        match self {
            Fallback::Misaligned => "the 2 MiB is not inside the mapping, aligned",
            Fallback::PastEof => "the 2 MiB reaches past the end of the file",
            Fallback::NotHugeExtent => "the blocks are not an aligned 2 MiB extent",
            Fallback::PteInRange => "a 4 KiB entry is in the range",
            Fallback::PrivateWrite => "a store to a private mapping",
            Fallback::Poisoned => "a page of the 2 MiB is poisoned",
        }
    }
}

impl fmt::Display for FaultEvent {
    /// As the kernel's trace prints `fs_dax:dax_pmd_fault_done`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.size {
            FaultSize::Pmd => "dax_pmd_fault_done",
            FaultSize::Pte => "dax_pte_fault_done",
        };
        write!(
            f,
            "{name}: ino {:#x} {} {} address {:#x} vm_start {:#x} vm_end {:#x} pgoff {:#x} \
             max_pgoff {:#x} ",
            self.ino,
            if self.shared { "shared" } else { "private" },
            if self.write { "WRITE" } else { "READ" },
            self.address,
            self.vm_start,
            self.vm_end,
            self.pgoff,
            self.max_pgoff
        )?;
        match self.result {
            FaultResult::NoPage => f.write_str("NOPAGE"),
            FaultResult::Fallback(why) => write!(f, "FALLBACK ({})", why.reason()),
            FaultResult::Sigbus => f.write_str("SIGBUS"),
        }
    }
}

/// A set of counters' listener, if any.
#[derive(Default)]
pub(super) struct Tracer {
    on: AtomicBool,
    sink: RwLock<Option<TraceSink>>,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer")
            .field("on", &self.on.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tracer {
    pub(super) fn set(&self, sink: Option<TraceSink>) {
        let mut slot = self.sink.write().unwrap_or_else(|e| e.into_inner());
        self.on.store(sink.is_some(), Ordering::Relaxed);
        *slot = sink;
    }

    /// Send the event `event` makes, if someone listens.
    #[inline]
    pub(super) fn emit(&self, event: impl FnOnce() -> FaultEvent) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let sink = self.sink.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = sink {
            sink(&event());
        }
    }
}
