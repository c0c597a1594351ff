fn main() {
    std::process::exit(coil_cli::run("coilctl", std::env::args_os().collect()));
}
