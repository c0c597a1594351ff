//! coil core: the vocabulary shared by coild, coilctl, the controller and the
//! recovery planner.
//!
//! The pure parts ([`cni`]: the CNI protocol; [`node`]: the allocation
//! state; the store's rules in [`store`]) and the adapters, each the only
//! code that knows its library: [`store::etcd`] (etcd-client),
//! [`store::embedded`] (the journal's store tree) and [`kernel`]
//! (rtnetlink). Also the failpoints of the chaos tests, the program names
//! and the exit-code table every binary shares.

pub use coil_journal as journal;

pub mod api;
pub mod cni;
pub mod errors;
pub mod failpoint;
pub mod kernel;
pub mod kernel_mem;
pub mod netns;
pub mod node;
pub mod planted;
pub mod store;

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
}

/// The programs coil ships; `hypercoil` dispatches to them by name.
pub const PROGRAMS: [&str; 5] = [
    "coil",
    "coild",
    "coilctl",
    "coil-controller",
    "coil-installer",
];
