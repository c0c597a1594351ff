//! coil's adapters: the code that knows a library the core must not.
//!
//! The core crate (`coil`) holds the model, the store's rules over its
//! [`coil::store::Backend`] seam and the kernel seam
//! [`coil::kernel::KernelOps`]; it compiles without etcd-client, tonic,
//! rtnetlink, nix or tokio's net features. What implements those seams
//! against the real world lives here:
//!
//! - [`etcd`]: [`etcd::EtcdBackend`], the store on an etcd cluster
//!   (etcd-client, tonic);
//! - [`remote`]: [`remote::RemoteBackend`], the embedded store of a running
//!   coild, through its Unix socket;
//! - [`any`]: [`AnyBackend`], whichever of those (or the embedded store in a
//!   journal this process owns) a configuration names;
//! - [`kernel`]: [`kernel::Kernel`], veths, addresses and routes over
//!   rtnetlink;
//! - [`netns`]: opening a path only if it is a pod's network namespace.

pub mod any;
pub mod etcd;
pub mod kernel;
pub mod netns;
mod nlsync;
pub mod remote;
mod wirer;

pub use any::AnyBackend;
