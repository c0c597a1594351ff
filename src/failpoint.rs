//! Failpoints: named places on the ADD, DEL, block acquire/release and
//! recovery paths where the chaos tests make coild die, as a crash at that
//! exact step would.
//!
//! Compiled in only with the `failpoints` feature (chaos-tests/run builds
//! coild with it); without it [`hit`] is an empty inline function. With
//! it, `COIL_FAILPOINTS=a,b` arms failpoints by name and the first one
//! reached aborts the process (SIGABRT: no destructor, no flush, like
//! kill -9).
//!
//! With the `planted` feature (test builds only), a test may also arm a
//! failpoint in its own process ([`arm_in_process`]): the next time it is
//! reached, `hit` panics with a [`Crash`] payload, which unwinds the
//! request that reached it before any later effect, and the test then
//! drops the daemon's runtime as a kill would (cli/tests/simkit).

/// Every failpoint, for the chaos harness to cycle through.
pub const ALL: [&str; 11] = [
    "add.reserved",
    "add.wired",
    "add.recorded",
    "del.releasing",
    "del.unwired",
    "acquire.intent",
    "acquire.leased",
    "release.intent",
    "release.released",
    "recovery.step",
    "recovery.applied",
];

/// The panic payload of an in-process failpoint: which one fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash(pub String);

#[cfg(feature = "planted")]
mod in_process {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    pub(super) static ON: AtomicBool = AtomicBool::new(false);
    /// (armed, fired)
    pub(super) static STATE: Mutex<(Option<String>, Option<String>)> = Mutex::new((None, None));

    pub(super) fn check(name: &str) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if st.0.as_deref() == Some(name) {
            st.0 = None;
            st.1 = Some(name.to_string());
            ON.store(false, Ordering::Relaxed);
            drop(st);
            std::panic::panic_any(super::Crash(name.to_string()));
        }
    }
}

/// Arms `name` in this process: its next hit panics with [`Crash`]
/// (tests only).
#[cfg(feature = "planted")]
pub fn arm_in_process(name: &str) {
    let mut st = in_process::STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.0 = Some(name.to_string());
    in_process::ON.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Disarms the in-process failpoint and returns the one that fired since
/// it was armed, if any (tests only).
#[cfg(feature = "planted")]
pub fn take_fired() -> Option<String> {
    in_process::ON.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut st = in_process::STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.0 = None;
    st.1.take()
}

/// Dies here if this failpoint is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "planted")]
    in_process::check(name);
    #[cfg(feature = "failpoints")]
    {
        if let Ok(armed) = std::env::var("COIL_FAILPOINTS") {
            if armed.split(',').any(|a| a == name) {
                eprintln!("failpoint {name}: aborting");
                std::process::abort();
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
