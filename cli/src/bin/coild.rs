fn main() {
    std::process::exit(coil_cli::run("coild", std::env::args_os().collect()));
}
