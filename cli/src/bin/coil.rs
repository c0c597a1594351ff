//! The CNI plugin. It calls the plugin directly (not through the
//! dispatcher) so the binary links only the protocol code: a small, fast
//! process per CNI call.
//!
//! `no_main`: the C runtime calls `main` below directly, skipping the Rust
//! runtime's start-up (which reads /proc/self/maps to place a stack guard
//! and installs signal stacks). A CNI plugin lives for a millisecond, and
//! that start-up was a fifth of its CPU time. Arguments and environment
//! work as usual (std reads them from the C runtime); a stack overflow
//! ends the process with SIGSEGV instead of a message.
// (A test build keeps the harness's main.)
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let code = coil_cli::plugin_flags(&args).unwrap_or_else(coil_cli::plugin::main);
    // Flush stdout the way std::process::exit would not.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    code
}
