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
        "coil" => plugin::main(),
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
            hypercoil_usage();
            exit::OK
        }
        "-V" | "--version" => {
            println!("hypercoil {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        _ => run(&name, args),
    }
}

fn hypercoil_usage() {
    eprintln!(
        "usage: hypercoil PROGRAM [ARGS...]   (or install it under a program's name)\n\
         programs: {}",
        coil::PROGRAMS.join(", ")
    );
}
