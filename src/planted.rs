//! Planted bugs: deliberate faults a test switches on to prove that the
//! in-process fault schedule (`cli/tests/sim.rs`) and the cluster simulator
//! (coil-sim) find the kind of bug it
//! is meant to find. Compiled to a constant `false` without the `planted`
//! feature, which only test builds enable (coil-cli's dev-dependency on
//! coil); a release build cannot contain them.

/// The bugs that can be planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Bug {
    /// DEL frees its addresses as soon as the release is recorded, while
    /// the pod's veth (holding them) still exists, so an ADD can get an
    /// address that is still on an interface.
    ReuseWhileTearingDown = 1,
    /// ADD wires the pod before its reservation and Wire intent are
    /// durable, so a crash in between leaves an address on an interface
    /// that the journal does not know and may hand out again.
    WireBeforeIntent = 2,
    /// The controller frees the blocks of a node whose liveness expired,
    /// without proof that its pods are gone (its Node object deleted), so
    /// a node cut off from the store loses its blocks to another node
    /// while its pods still hold their addresses.
    FreeOnLivenessExpiry = 4,
    /// coild records a new boot in its journal at start, not once the
    /// store confirmed the leases, so a coild restarted after a reboot
    /// before the store answered serves (and publishes) blocks the
    /// cluster may have given away while the node was off.
    BootRecordedAtStart = 8,
}

#[cfg(feature = "planted")]
static PLANTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Is `bug` planted in this process?
#[inline]
pub fn on(bug: Bug) -> bool {
    #[cfg(feature = "planted")]
    {
        PLANTED.load(std::sync::atomic::Ordering::Relaxed) & (bug as u32) != 0
    }
    #[cfg(not(feature = "planted"))]
    {
        let _ = bug;
        false
    }
}

/// Plants `bug` in this whole process (tests only).
#[cfg(feature = "planted")]
pub fn plant(bug: Bug) {
    PLANTED.fetch_or(bug as u32, std::sync::atomic::Ordering::Relaxed);
}

/// Removes every planted bug (tests only).
#[cfg(feature = "planted")]
pub fn clear() {
    PLANTED.store(0, std::sync::atomic::Ordering::Relaxed);
}
