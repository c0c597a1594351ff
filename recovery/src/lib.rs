//! coil-recovery: brings a node's journal, the cluster store and the kernel
//! back into agreement after a crash, an outage or a reboot.
//!
//! The crate follows observe -> diff -> plan -> apply: the diff and the plan
//! are pure functions over plain data, table-tested without root; apply
//! performs each step as a journaled, idempotent effect. It arrives with the
//! recovery issue; until then it holds no code, so nothing pretends to
//! recover.
