//! The CNI plugin. It calls the plugin directly (not through the
//! dispatcher) so the binary links only the protocol code: a small, fast
//! process per CNI call.
fn main() {
    std::process::exit(coil_cli::plugin::main());
}
