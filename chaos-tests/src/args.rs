//! Command-line arguments.

use super::*;

pub(crate) struct Args {
    pub(crate) duration: Duration,
    pub(crate) seed: u64,
    pub(crate) bin_dir: PathBuf,
    pub(crate) workers: usize,
    /// --workers was given (the cluster mode's default differs).
    pub(crate) workers_given: bool,
    pub(crate) summary: Option<PathBuf>,
    /// The multi-node mode (cluster.rs).
    pub(crate) cluster: bool,
}

pub(crate) fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        duration: Duration::from_secs(150),
        seed: rand::thread_rng().gen(),
        bin_dir: PathBuf::from("target/chaos/debug"),
        workers: 3,
        workers_given: false,
        summary: None,
        cluster: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match x.as_str() {
            "--short" => a.duration = Duration::from_secs(150),
            "--long" => a.duration = Duration::from_secs(1800),
            "--duration" => {
                a.duration = Duration::from_secs(
                    val("--duration")?
                        .parse()
                        .map_err(|_| "--duration SECONDS")?,
                )
            }
            "--seed" => a.seed = val("--seed")?.parse().map_err(|_| "--seed N")?,
            "--bin-dir" => a.bin_dir = PathBuf::from(val("--bin-dir")?),
            "--workers" => {
                a.workers = val("--workers")?.parse().map_err(|_| "--workers N")?;
                a.workers_given = true;
            }
            "--cluster" => a.cluster = true,
            "--summary" => a.summary = Some(PathBuf::from(val("--summary")?)),
            "-h" | "--help" => {
                println!(
                    "chaos-tests/run [--cluster] [--short|--long] [--seed N] [--duration SECS] [--workers N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}
