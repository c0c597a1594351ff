fn main() {
    std::process::exit(coil_cli::run(
        "coil-installer",
        std::env::args_os().collect(),
    ));
}
