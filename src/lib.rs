//! coil core: the vocabulary shared by coild, coilctl, the controller and the
//! recovery planner.
//!
//! The pure parts ([`cni`]: the CNI protocol; [`node`]: the allocation
//! state; the store's rules in [`store`] over its [`store::Backend`] seam;
//! the kernel seam [`kernel::KernelOps`] and its in-memory model
//! [`kernel_mem`]) and the one adapter that needs nothing from outside:
//! [`store::embedded`], the store in the journal's own tree. The adapters
//! that reach the outside world (etcd, coild's socket, rtnetlink, netns
//! paths) live in the coil-adapters crate, so this crate compiles without
//! etcd-client, tonic, rtnetlink, nix or tokio's net features
//! (scripts/check-layers keeps it so). Also the failpoints of the chaos
//! tests, the program names and the exit-code table every binary shares.

pub use coil_journal as journal;

pub mod api;
pub mod cni;
pub mod errors;
pub mod failpoint;
pub mod kernel;
pub mod kernel_mem;
pub mod machine;
pub mod node;
pub mod planted;
pub mod removal;
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
