//! The wiring threads: a few dedicated OS threads that run the blocking
//! rtnetlink requests of an ADD ([`crate::nlsync`]).
//!
//! *Invariants:* a wiring thread is in the kernel's home network
//! namespace whenever it is not inside [`Worker::socket_in`]; a thread
//! that cannot return home exits instead of running another job, and a
//! replacement is started on the next job. Only these threads, the
//! short-lived threads of [`crate::kernel`] and the caller's own thread
//! of `Kernel::wire_blocking` ever call `setns`; no runtime thread does.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use nix::sched::CloneFlags;

use crate::nlsync::Nl;

/// How many wiring threads run. The kernel serialises link creation under
/// its rtnl lock, so more would only wait there; a few let one ADD's
/// requests run while other threads wait for their reservations' journal
/// sync ([`crate::kernel::Kernel::wire_after`]) or are being woken.
const THREADS: usize = 4;

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A wiring thread's state: its socket in the home namespace.
pub(crate) struct Worker {
    pub host: Nl,
    home: Arc<File>,
    /// Set when the thread could not return to its home namespace.
    lost: bool,
}

impl Worker {
    /// A worker state for the calling thread, which enters `home` and
    /// stays there (see [`crate::kernel::Kernel::wire_blocking`]).
    pub fn here(home: Arc<File>) -> std::io::Result<Worker> {
        nix::sched::setns(&*home, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        Ok(Worker {
            host: Nl::open()?,
            home,
            lost: false,
        })
    }

    /// A socket in the network namespace `ns` (the thread enters it, opens
    /// the socket and returns home).
    pub fn socket_in(&mut self, ns: &File) -> std::io::Result<Nl> {
        nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let made = Nl::open();
        if let Err(e) = nix::sched::setns(&*self.home, CloneFlags::CLONE_NEWNET) {
            self.lost = true;
            return Err(std::io::Error::other(format!(
                "returning to the home network namespace: {e}"
            )));
        }
        made
    }
}

/// The pool of wiring threads of one kernel client.
pub(crate) struct Wirer {
    tx: mpsc::Sender<Job>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    home: Arc<File>,
    live: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Wirer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wirer")
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl Wirer {
    /// A pool whose threads live in the namespace `home`; threads start on
    /// the first job.
    pub fn new(home: File) -> Wirer {
        let (tx, rx) = mpsc::channel();
        Wirer {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            home: Arc::new(home),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The home namespace of this pool's threads.
    pub fn home(&self) -> Arc<File> {
        self.home.clone()
    }

    /// Starts threads until [`THREADS`] are live.
    fn fill(&self) -> std::io::Result<()> {
        loop {
            // A slot is claimed before its thread starts, so racing callers
            // never start more than THREADS between them.
            let n = self.live.load(Ordering::Acquire);
            if n >= THREADS {
                return Ok(());
            }
            if self
                .live
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let (rx, home, live) = (self.rx.clone(), self.home.clone(), self.live.clone());
            let spawned = std::thread::Builder::new()
                .name("coil-wire".into())
                .spawn(move || run(rx, home, live));
            if let Err(e) = spawned {
                self.live.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
        }
    }

    /// Runs `f` on a wiring thread and waits for its result.
    pub async fn run<T, E>(
        &self,
        f: impl FnOnce(&mut Worker) -> Result<T, E> + Send + 'static,
    ) -> Result<T, WireJobError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        Self::wait(self.submit(f)).await
    }

    /// Hands `f` to a wiring thread now (a thread may start on it before
    /// the caller's task is next polled); [`Wirer::wait`] takes its result.
    pub fn submit<T, E>(
        &self,
        f: impl FnOnce(&mut Worker) -> Result<T, E> + Send + 'static,
    ) -> Result<Pending<T, E>, WireJobError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        self.fill().map_err(|e| WireJobError::Pool(e.to_string()))?;
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |w| {
            let _ = done.send(f(w));
        });
        self.tx
            .send(job)
            .map_err(|_| WireJobError::Pool("no wiring thread is left".into()))?;
        Ok(answer)
    }

    /// The result of a job handed over by [`Wirer::submit`].
    pub async fn wait<T, E>(
        pending: Result<Pending<T, E>, WireJobError<E>>,
    ) -> Result<T, WireJobError<E>> {
        match pending?.await {
            Ok(r) => r.map_err(WireJobError::Job),
            Err(_) => Err(WireJobError::Pool(
                "the wiring thread ended before it answered".into(),
            )),
        }
    }
}

/// A job handed to a wiring thread, not yet answered.
pub(crate) type Pending<T, E> = tokio::sync::oneshot::Receiver<Result<T, E>>;

/// Why [`Wirer::run`] failed: the job's own error, or the pool's.
pub(crate) enum WireJobError<E> {
    Job(E),
    Pool(String),
}

fn run(rx: Arc<Mutex<mpsc::Receiver<Job>>>, home: Arc<File>, live: Arc<AtomicUsize>) {
    struct Leaving(Arc<AtomicUsize>);
    impl Drop for Leaving {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _leaving = Leaving(live);
    if let Err(e) = nix::sched::setns(&*home, CloneFlags::CLONE_NEWNET) {
        tracing::error!("wiring thread: entering the home network namespace: {e}");
        return;
    }
    let host = match Nl::open() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("wiring thread: opening a netlink socket: {e}");
            return;
        }
    };
    let mut worker = Worker {
        host,
        home,
        lost: false,
    };
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            // Every sender is gone: the kernel client was dropped.
            return;
        };
        job(&mut worker);
        if worker.lost {
            tracing::error!(
                "a wiring thread could not return to the home network namespace; it exits"
            );
            return;
        }
    }
}
