//! coil's programs, as thin layers over the library crates.
//!
//! Every binary in `src/bin/` is one line that calls [`run`] with its own
//! name; `hypercoil` picks the name from argv[0] or its first argument, so
//! one file can be installed under every name (symlinks) or called as
//! `hypercoil coilctl ...`.

use std::ffi::OsString;
use std::path::Path;

pub mod coilctl;
pub mod coild;
pub mod config;
pub mod controller;
mod ctl_config;
pub(crate) mod ctl_repair;
mod ctl_store;
pub mod installer;
pub mod kube;
pub mod metrics;
mod output;
pub mod plugin;

use coil::exit;

/// Parses a program's arguments; on failure prints clap's message (help and
/// version go to stdout) and returns the exit code.
pub(crate) fn parse_args<P: clap::Parser>(args: Vec<OsString>) -> Result<P, i32> {
    P::try_parse_from(args).map_err(|e| {
        let code = if e.use_stderr() {
            exit::USAGE
        } else {
            exit::OK
        };
        let _ = e.print();
        code
    })
}

/// The tokio runtime a program runs on (two workers, or the current
/// thread for one-shot commands); on failure says so as `program`.
pub(crate) fn runtime(program: &str, multi_thread: bool) -> Result<tokio::runtime::Runtime, i32> {
    let mut b = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("{program}: starting the async runtime: {e}");
        exit::PROBLEMS
    })
}

/// Runs `program` with `args` (args[0] is the program name as invoked) and
/// returns the process exit code.
pub fn run(program: &str, args: Vec<OsString>) -> i32 {
    match program {
        "coilctl" => coilctl::main(args),
        "coil" => plugin_flags(&args).unwrap_or_else(plugin::main),
        "coild" => coild::main(args),
        "coil-controller" => controller::main(args),
        "coil-installer" => installer::main(args),
        other => {
            eprintln!("hypercoil: unknown program {other:?}");
            hypercoil_usage();
            exit::USAGE
        }
    }
}

/// The multi-call entry point: dispatches on the basename of argv[0], or on
/// argv[1] when invoked as `hypercoil`.
pub fn hypercoil(mut args: Vec<OsString>) -> i32 {
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != "hypercoil" && coil::PROGRAMS.contains(&name.as_str()) {
        return run(&name, args);
    }
    if args.len() < 2 {
        hypercoil_usage();
        return exit::USAGE;
    }
    args.remove(0);
    let name = args[0].to_string_lossy().into_owned();
    match name.as_str() {
        "-h" | "--help" | "help" => {
            println!("{}", hypercoil_help());
            exit::OK
        }
        "-V" | "--version" => {
            println!("hypercoil {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        _ => run(&name, args),
    }
}

fn hypercoil_help() -> String {
    format!(
        "usage: hypercoil PROGRAM [ARGS...]   (or install it under a program's name)\n\
         programs: {}\n\
         `hypercoil PROGRAM --help` describes each one.",
        coil::PROGRAMS.join(", ")
    )
}

fn hypercoil_usage() {
    eprintln!("{}", hypercoil_help());
}

/// Answers `coil --help`, `-h`, `--version` and `-V`, or returns None. The
/// CNI plugin takes no arguments (a runtime passes everything in the
/// environment and on stdin), so a lone flag is a person asking; answering
/// it here keeps the plugin from waiting on a terminal's stdin.
pub fn plugin_flags(args: &[OsString]) -> Option<i32> {
    if args.len() != 2 {
        return None;
    }
    match args[1].to_str()? {
        "-h" | "--help" => {
            println!(
                "coil: the CNI plugin, a thin client of coild\n\n\
                 usage: coil < NETCONF   (run by the container runtime)\n       \
                 coil --help | --version\n\n\
                 The runtime sets CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC or VERSION),\n\
                 CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH, and writes\n\
                 the network configuration on stdin. coil asks coild (on {}, or the\n\
                 configuration's \"socket\") to do the work and prints the CNI result\n\
                 or error on stdout.",
                plugin::DEFAULT_SOCKET
            );
            Some(exit::OK)
        }
        "-V" | "--version" => {
            println!("coil {}", env!("CARGO_PKG_VERSION"));
            Some(exit::OK)
        }
        _ => None,
    }
}
