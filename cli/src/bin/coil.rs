fn main() {
    std::process::exit(coil_cli::run("coil", std::env::args_os().collect()));
}
