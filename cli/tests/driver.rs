//! coild's direct engine (`--engine direct`, the fallback) in-process,
//! without root: the real daemon, journal and
//! embedded store over the in-memory kernel model (`MemKernel`). A "kill"
//! drops the daemon's runtime mid-flight (its tasks and volatile state are
//! gone; what the journal holds stays, as does the kernel); a "reboot"
//! also empties the kernel and changes the boot id. The same behaviour is
//! tested against the real kernel, as root, in cni.rs and recovery.rs.
//!
//! The cases live in driver_cases/cases.rs; engine.rs runs the same cases
//! with coild driving the node machine (`--engine machine`, the default).

mod fakekube;
mod simkit;

const ENGINE: coil_cli::coild::EngineChoice = coil_cli::coild::EngineChoice::Direct;

include!("driver_cases/cases.rs");
