fn main() {
    std::process::exit(coil_cli::run(
        "coil-controller",
        std::env::args_os().collect(),
    ));
}
