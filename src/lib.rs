//! coil core: the vocabulary shared by coild, coilctl, the controller and the
//! recovery planner.
//!
//! This crate will hold the pure parts of coil (the allocator, the per-node
//! state machine, CNI protocol types) and the etcd and kernel adapters in
//! their own modules. Today it holds the cluster store ([`store`]: pools,
//! subnets, fenced block leases, node liveness, the address index, over etcd
//! or the embedded journal-backed backend), the program names and the
//! exit-code table every binary shares.

pub use coil_journal as journal;

pub mod cni;
pub mod failpoint;
pub mod kernel;
pub mod node;
pub mod store;
#[doc(hidden)]
pub mod testkit;

/// Exit codes shared by coil's command-line programs.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The command ran and found problems (for example `journal verify`
    /// found corrupt records).
    pub const PROBLEMS: i32 = 1;
    /// Bad input: unknown flag, malformed argument.
    pub const USAGE: i32 = 2;
    /// A dependency is unreachable or busy (etcd down, journal locked): a
    /// retry later can succeed.
    pub const UNAVAILABLE: i32 = 3;
    /// The program or subcommand exists but is not implemented yet.
    pub const NOT_IMPLEMENTED: i32 = 69;
}

/// The programs coil ships; `hypercoil` dispatches to them by name.
pub const PROGRAMS: [&str; 5] = [
    "coil",
    "coild",
    "coilctl",
    "coil-controller",
    "coil-installer",
];
