//! The one table of what can go wrong and what each caller is told.
//!
//! Every error coil reports has an [`ErrorKind`]; a kind has exactly one
//! CNI code (what kubelet or containerd sees from the plugin) and one exit
//! code (what a shell sees from coilctl). `StoreError::kind` and coild's
//! `DaemonError::kind` classify; nothing else maps errors to codes.
//! docs/operations.md prints [`ErrorKind::ALL`] as a table, and a test
//! keeps the two equal.

use crate::cni::code;
use crate::exit;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller's input can never be valid: a name, a subnet, a block
    /// size, a network configuration.
    BadInput,
    /// The CNI environment names a path that is not a pod's network
    /// namespace (coild's own, the host's, a regular file, a FIFO).
    BadEnv,
    /// The pod's network namespace does not exist.
    NetnsMissing,
    /// The pod's interface name is already taken in its namespace.
    InterfaceExists,
    /// No such pool, and no default pool.
    NoPool,
    /// The pool has no free block of a family the pod needs.
    Exhausted,
    /// The cluster's state forbids the request: a pool that exists, an
    /// overlapping subnet, a pool still in use, a live node, a block
    /// another node holds, a store newer than this coil.
    Refused,
    /// Retrying later can succeed: the store unreachable, a race lost too
    /// often, coild busy, a kernel call past its deadline, the journal
    /// being reopened.
    TryAgain,
    /// This node was removed from the cluster and leases nothing until
    /// `coilctl node readmit`: a runtime retries, an operator must act.
    Fenced,
    /// The kernel refused a change (netlink).
    Kernel,
    /// The node's journal failed a write.
    Journal,
    /// CHECK found the kernel different from the journal.
    CheckFailed,
    /// A store entry that fails validation against its key.
    Corrupt,
    /// A bug or an impossible state in coil.
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order of the documented table.
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::BadInput,
        ErrorKind::BadEnv,
        ErrorKind::NetnsMissing,
        ErrorKind::InterfaceExists,
        ErrorKind::NoPool,
        ErrorKind::Exhausted,
        ErrorKind::Refused,
        ErrorKind::TryAgain,
        ErrorKind::Fenced,
        ErrorKind::Kernel,
        ErrorKind::Journal,
        ErrorKind::CheckFailed,
        ErrorKind::Corrupt,
        ErrorKind::Internal,
    ];

    /// The table: (CNI code, exit code) of each kind.
    pub const fn codes(self) -> (u32, i32) {
        match self {
            ErrorKind::BadInput => (code::INVALID_CONFIG, exit::USAGE),
            ErrorKind::BadEnv => (code::INVALID_ENV, exit::USAGE),
            ErrorKind::NetnsMissing => (code::NETNS_MISSING, exit::PROBLEMS),
            ErrorKind::InterfaceExists => (code::INTERFACE_EXISTS, exit::PROBLEMS),
            ErrorKind::NoPool => (code::NO_POOL, exit::PROBLEMS),
            ErrorKind::Exhausted => (code::POOL_EXHAUSTED, exit::PROBLEMS),
            ErrorKind::Refused => (code::INTERNAL, exit::PROBLEMS),
            ErrorKind::TryAgain => (code::TRY_AGAIN_LATER, exit::UNAVAILABLE),
            ErrorKind::Fenced => (code::TRY_AGAIN_LATER, exit::PROBLEMS),
            ErrorKind::Kernel => (code::KERNEL, exit::PROBLEMS),
            ErrorKind::Journal => (code::JOURNAL, exit::PROBLEMS),
            ErrorKind::CheckFailed => (code::CHECK_FAILED, exit::PROBLEMS),
            ErrorKind::Corrupt => (code::INTERNAL, exit::PROBLEMS),
            ErrorKind::Internal => (code::INTERNAL, exit::PROBLEMS),
        }
    }

    /// The CNI error code a runtime sees.
    pub const fn cni_code(self) -> u32 {
        self.codes().0
    }

    /// The exit code coilctl ends with.
    pub const fn exit_code(self) -> i32 {
        self.codes().1
    }

    /// Can the same request succeed if retried later, unchanged?
    pub const fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::TryAgain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/operations.md's table of error kinds is this table.
    #[test]
    fn the_documented_table_is_the_table() {
        let doc = include_str!("../docs/operations.md");
        let rows: Vec<(String, u32, i32)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let kind = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let cni = cells.get(2)?.parse().ok()?;
                let exit = cells.get(3)?.parse().ok()?;
                Some((kind.to_string(), cni, exit))
            })
            .collect();
        let want: Vec<(String, u32, i32)> = ErrorKind::ALL
            .iter()
            .map(|k| (format!("{k:?}"), k.cni_code(), k.exit_code()))
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn only_try_again_is_retryable_and_every_code_is_coils_or_the_specs() {
        for k in ErrorKind::ALL {
            assert_eq!(k.is_retryable(), k.exit_code() == exit::UNAVAILABLE);
            let c = k.cni_code();
            assert!(
                c == 4 || c == 7 || c == 11 || (100..=107).contains(&c),
                "{k:?}"
            );
        }
    }
}
