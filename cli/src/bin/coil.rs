//! The CNI plugin. It calls the plugin directly (not through the
//! dispatcher) so the binary links only the protocol code: a small, fast
//! process per CNI call.
fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(coil_cli::plugin_flags(&args).unwrap_or_else(coil_cli::plugin::main));
}
