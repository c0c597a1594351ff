//! Failpoints: named places on the ADD, DEL, block acquire/release and
//! recovery paths where the chaos tests make coild die, as a crash at that
//! exact step would.
//!
//! Compiled in only with the `failpoints` feature (chaos-tests/run builds
//! coild with it); without it [`hit`] is an empty inline function. With
//! it, `COIL_FAILPOINTS=a,b` arms failpoints by name and the first one
//! reached aborts the process (SIGABRT: no destructor, no flush, like
//! kill -9).

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

/// Dies here if this failpoint is armed.
#[inline]
pub fn hit(name: &str) {
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
