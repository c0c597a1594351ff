fn main() {
    std::process::exit(coil_cli::hypercoil(std::env::args_os().collect()));
}
