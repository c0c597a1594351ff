//! coild as a driver of the node machine (`--engine machine`).
//!
//! [`coil::machine::NodeMachine`] decides; this module does what it
//! decides, in the order raft-rs's drivers follow with a `Ready`:
//!
//! 1. feed the machine every event that is waiting (requests, effects'
//!    outcomes, a tick), up to [`ROUND`] of them;
//! 2. make the records of all their outputs durable in one journal batch
//!    (fsynced unless every record may be lost, see [`Output::sync`]): the
//!    round's group commit;
//! 3. only then start the effects, each in a task of its own whose outcome
//!    comes back as an event;
//! 4. only then answer.
//!
//! A crash anywhere leaves what step 2 made durable; the next start rebuilds
//! the machine from the journal ([`NodeMachine::start`]) and re-issues every
//! effect a pending intent announces. The machine's decisions are checked
//! by the cluster simulator (coil-sim) under crashes at every effect
//! boundary; this driver adds nothing to decide. Failpoints sit at the
//! same boundaries, under the names the direct engine uses, so the chaos
//! harness kills this engine where it kills the other.
//!
//! The allocation the rest of coild reads (stats, metrics, the address
//! index, CHECK) is a copy of the machine's, published after each round.

use super::*;
use coil::machine::{
    Answer, Durable, Effect, EffectId, MachineConfig, NodeMachine, Outcome, Output, PodMeta, Rec,
    ReqId, Request as Req,
};
use coil::store::model::validate_node_name;
use tokio::sync::{mpsc::UnboundedReceiver, mpsc::UnboundedSender, oneshot};

/// Most events fed to the machine before their records are committed.
const ROUND: usize = 256;

/// A repair or resync run by recovery while the machine is quiescent.
pub(super) struct RecoverJob {
    pub dry_run: bool,
    pub full_scan: bool,
    pub store_scan: bool,
    pub reply: oneshot::Sender<DResult<Vec<coil_recovery::Outcome>>>,
}

pub(super) enum Event {
    Request(Req, oneshot::Sender<Answer>),
    /// An effect of the machine of generation `.0` ended.
    Done(u64, EffectId, Outcome),
    Tick,
    Recover(RecoverJob),
}

/// A veth doomed by an `Unwire` effect, waiting for the batched deletion:
/// its host name, and the effect to answer `Unwired` once it is gone.
type Doomed = (String, u64, EffectId);

/// The result of a fresh reservation's wire (see `Driver::prepare`).
type WireRx = oneshot::Receiver<Result<coil::kernel::Wired, KernelError>>;

/// The handle requests use to reach the machine.
pub(super) struct Engine {
    tx: UnboundedSender<Event>,
    /// MAC addresses of veths wired by the machine's effects, for the ADD
    /// answer (taken by it).
    wired: Mutex<HashMap<AttachmentKey, coil::kernel::Wired>>,
    /// Pod netns opened (and checked) by an ADD before it reached the
    /// machine, for its wire to use (the kernel's `Netns`, type-erased).
    netns: Mutex<HashMap<AttachmentKey, Box<dyn std::any::Any + Send>>>,
    /// The batched teardown's queue (see `teardown`).
    doomed: mpsc::Sender<Doomed>,
    /// The generation of the machine now running: a teardown of an
    /// earlier one's is not finished by name (recovery settled it, and the
    /// name may be a new pod's veth by now).
    generation: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Request(r, _) => write!(f, "Request({r:?})"),
            Event::Done(g, id, o) => write!(f, "Done({g}, {id}, {o:?})"),
            Event::Tick => write!(f, "Tick"),
            Event::Recover(_) => write!(f, "Recover"),
        }
    }
}

fn stopped() -> DaemonError {
    DaemonError::Busy("coild's node machine stopped; coild restarts".into())
}

impl Engine {
    pub(super) fn new() -> (Engine, UnboundedReceiver<Event>, mpsc::Receiver<Doomed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (dtx, drx) = mpsc::channel(TEARDOWN_QUEUE);
        (
            Engine {
                tx,
                wired: Mutex::new(HashMap::new()),
                netns: Mutex::new(HashMap::new()),
                doomed: dtx,
                generation: AtomicU64::new(0),
            },
            rx,
            drx,
        )
    }

    fn put_netns(&self, key: AttachmentKey, ns: Box<dyn std::any::Any + Send>) {
        let mut m = self.netns.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(key, ns);
    }

    fn take_netns<N: 'static>(&self, key: &AttachmentKey) -> Option<N> {
        let ns = self
            .netns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)?;
        ns.downcast::<N>().ok().map(|b| *b)
    }

    /// Sends a request to the machine and waits for its answer.
    pub(super) async fn call(&self, r: Req) -> DResult<Answer> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Request(r, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    pub(super) async fn recover(
        &self,
        dry_run: bool,
        full_scan: bool,
        store_scan: bool,
    ) -> DResult<Vec<coil_recovery::Outcome>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Recover(RecoverJob {
                dry_run,
                full_scan,
                store_scan,
                reply,
            }))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Is `g` the generation of the machine now running?
    fn current(&self, g: u64) -> bool {
        self.generation.load(Ordering::Relaxed) == g
    }

    fn take_wired(&self, key: &AttachmentKey) -> Option<coil::kernel::Wired> {
        self.wired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    fn put_wired(&self, key: AttachmentKey, w: coil::kernel::Wired) {
        let mut m = self.wired.lock().unwrap_or_else(|e| e.into_inner());
        // Answers not taken (the caller gave up) must not pile up.
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(key, w);
    }
}

/// The answer a request got from the machine, as coild's error.
fn failed(a: Answer) -> DaemonError {
    match a {
        Answer::Failed(kind, msg) => DaemonError::Machine(kind, msg),
        other => DaemonError::Internal(format!(
            "unexpected answer from the node machine: {other:?}"
        )),
    }
}

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    fn engine(&self) -> Option<&Engine> {
        self.engine.get()
    }

    /// Starts the machine's driver and its clock. The answer resolves
    /// when the started machine first has no effect in flight (what its
    /// start rolled forward, viewed and scanned is done).
    pub(super) fn start_engine(self: &Arc<Self>) -> oneshot::Receiver<()> {
        let (e, rx, drx) = Engine::new();
        let tx = e.tx.clone();
        let (settled, done) = oneshot::channel();
        if self.engine.set(e).is_err() {
            return done;
        }
        tokio::spawn(run(self.clone(), tx.clone(), rx, settled));
        tokio::spawn(teardown(self.clone(), tx.clone(), drx));
        let period = self.cfg.resync_interval;
        let d = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                if tx.send(Event::Tick).is_err() {
                    return;
                }
                // The address index is a mirror whose queued updates a
                // kill loses: it is compared with the journal on the first
                // tick and every tenth, as the direct engine's full
                // resync does.
                // (Links and host routes no attachment owns are the
                // machine's to find: it asks for a scan every
                // `coil::machine::SCAN_EVERY` ticks.)
                if n % 10 == 1 {
                    d.reconcile_index().await;
                }
            }
        });
        done
    }

    /// Recovery through the machine's driver, when it runs.
    pub(super) async fn recover_via_engine(
        &self,
        dry_run: bool,
        full_scan: bool,
        store_scan: bool,
    ) -> Option<DResult<Vec<coil_recovery::Outcome>>> {
        let e = self.engine()?;
        Some(e.recover(dry_run, full_scan, store_scan).await)
    }

    /// ADD through the machine. None: the direct engine serves.
    pub(super) async fn add_via_engine(
        self: &Arc<Self>,
        req: &Request,
    ) -> Option<DResult<AddResult>> {
        let e = self.engine()?;
        Some(self.add_machine(e, req).await)
    }

    async fn add_machine(self: &Arc<Self>, e: &Engine, req: &Request) -> DResult<AddResult> {
        let t0 = Instant::now();
        let key = request_key(req);
        let netns = req.netns.clone().unwrap_or_default();
        let wired = matches!(
            self.lock().lookup(&key),
            Some(a) if a.state == AttachmentState::Wired
        );
        // A new attachment: the path must be a pod's own network namespace
        // (never coild's or the host's), and its pool is looked up here
        // (cached), outside the machine.
        let (pool, families) = if wired {
            (String::new(), Vec::new())
        } else {
            let ns = deadline(
                format!("opening {netns}"),
                self.kernel.open_pod_netns(&netns),
            )
            .await?;
            let shape = self.pool_for(req.pod.namespace.as_deref()).await?;
            e.put_netns(key.clone(), Box::new(ns));
            shape
        };
        let pod = PodMeta {
            namespace: req.pod.namespace.clone().unwrap_or_default(),
            name: req.pod.name.clone().unwrap_or_default(),
            created_unix: coil::journal::now_unix(),
        };
        let t1 = t0.elapsed();
        let answer = e
            .call(Req::Add {
                key: key.clone(),
                netns,
                pool: pool.clone(),
                families: families.clone(),
                pod,
            })
            .await;
        // A handle the wire did not take (the ADD was refused) is closed.
        drop(e.take_netns::<K::Netns>(&key));
        let answer = answer?;
        let t2 = t0.elapsed();
        match answer {
            Answer::Added(_) => {
                let a = self.lock().lookup(&key).cloned().ok_or_else(|| {
                    DaemonError::Internal(format!("{key} was added but is not recorded"))
                })?;
                let w = match e.take_wired(&a.key) {
                    Some(w) => w,
                    None => {
                        deadline(
                            format!("reading the wiring of {key}"),
                            self.kernel.wire_info(&self.spec(&a)),
                        )
                        .await?
                    }
                };
                tracing::debug!(
                    attachment = %key,
                    before_us = t1.as_micros() as u64,
                    machine_us = (t2 - t1).as_micros() as u64,
                    total_us = t0.elapsed().as_micros() as u64,
                    "ADD"
                );
                Ok(self.result(&a, w.host_mac, w.pod_mac))
            }
            Answer::Failed(ErrorKind::Exhausted, msg) => {
                self.cfg.events.emit(crate::kube::NodeEvent::PoolExhausted {
                    pool,
                    family: families
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                });
                Err(DaemonError::Machine(ErrorKind::Exhausted, msg))
            }
            other => Err(failed(other)),
        }
    }

    /// DEL through the machine. None: the direct engine serves.
    pub(super) async fn del_via_engine(&self, req: &Request) -> Option<DResult<()>> {
        let e = self.engine()?;
        Some(
            match e
                .call(Req::Del {
                    key: request_key(req),
                })
                .await
            {
                Ok(Answer::Deleted) => Ok(()),
                Ok(a) => Err(failed(a)),
                Err(x) => Err(x),
            },
        )
    }

    /// GC through the machine. None: the direct engine serves.
    pub(super) async fn gc_via_engine(&self, req: &Request) -> Option<DResult<()>> {
        let e = self.engine()?;
        let network = req.conf.name.as_str();
        let Some(list) = &req.conf.valid_attachments else {
            return Some(Err(DaemonError::Config(format!(
                "GC of network {network:?} needs cni.dev/valid-attachments; nothing was released"
            ))));
        };
        let keep: BTreeSet<AttachmentKey> = list
            .iter()
            .map(|v| AttachmentKey::new(network, &v.container_id, &v.ifname))
            .collect();
        match e
            .call(Req::Gc {
                network: network.to_string(),
                keep: keep.clone(),
            })
            .await
        {
            Ok(Answer::Collected) => {}
            Ok(a) => return Some(Err(failed(a))),
            Err(x) => return Some(Err(x)),
        }
        // The machine answers once the releases are durable; GC answers
        // once they are done (their veths gone), as the direct engine
        // does, so a failure is the runtime's to see and retry.
        let until = Instant::now() + KERNEL_DEADLINE;
        loop {
            let left: Vec<String> = self
                .lock()
                .attachments()
                .filter(|a| a.key.network == network && !keep.contains(&a.key))
                .map(|a| a.key.to_string())
                .collect();
            if left.is_empty() {
                return Some(Ok(()));
            }
            if Instant::now() >= until {
                return Some(Err(DaemonError::Busy(format!(
                    "GC released the stale attachments but {} still wait for their veths \
                     to go ({}); they are retried",
                    left.len(),
                    left.join(", ")
                ))));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// CHECK's first half through the machine (is the attachment wired
    /// and idle?). None: the direct engine serves.
    pub(super) async fn check_via_engine(&self, key: &AttachmentKey) -> Option<DResult<()>> {
        let e = self.engine()?;
        Some(match e.call(Req::Check { key: key.clone() }).await {
            Ok(Answer::Checked) => Ok(()),
            Ok(Answer::Failed(_, msg)) => Err(DaemonError::Check(msg)),
            Ok(a) => Err(failed(a)),
            Err(x) => Err(x),
        })
    }

    /// STATUS through the machine. None: the direct engine serves.
    pub(super) async fn status_via_engine(&self) -> Option<DResult<()>> {
        let e = self.engine()?;
        Some(match e.call(Req::Status).await {
            Ok(Answer::Ready) => Ok(()),
            Ok(Answer::Failed(_, msg)) => Err(DaemonError::Busy(msg)),
            Ok(a) => Err(failed(a)),
            Err(x) => Err(x),
        })
    }
}

/// The driver's state: the machine, its generation (bumped each time it is
/// rebuilt, so a late outcome of an earlier machine's effect is dropped)
/// and the callers waiting for answers.
struct Driver<B: Backend, K: KernelOps> {
    d: Arc<Daemon<B, K>>,
    tx: UnboundedSender<Event>,
    m: NodeMachine,
    generation: u64,
    next_req: ReqId,
    waiting: HashMap<ReqId, oneshot::Sender<Answer>>,
    /// The last table read failed: the next one waits a little.
    table_failing: Arc<AtomicBool>,
    /// The machine was (re)started: publish its whole allocation.
    republish: bool,
    /// Told when the started machine first has no effect in flight: its
    /// start's roll-forward, views and scan are done.
    settled: Option<oneshot::Sender<()>>,
}

fn machine_config<B: Backend, K: KernelOps>(d: &Daemon<B, K>) -> MachineConfig {
    MachineConfig {
        node: d.cfg.node_name.clone(),
        boot_id: d.boot_id.clone(),
        min_blocks: d.cfg.min_blocks,
        mtu: d.cfg.mtu,
    }
}

/// What the journal holds, as the machine starts from it. `rebooted`:
/// the store has not confirmed the leases since this boot.
fn durable(j: &Journal, rebooted: bool) -> DResult<Durable> {
    let mut d = Durable {
        rebooted,
        next_intent: j.next_intent_id(),
        ..Durable::default()
    };
    for l in j.leases()? {
        d.leases.insert(l.block, l);
    }
    for a in j.attachments()? {
        d.attachments.insert(a.key.clone(), a);
    }
    for i in j.pending_intents()? {
        d.intents.insert(i.id, i);
    }
    for (addr, e) in j.addresses()? {
        d.addresses.insert(addr, e);
    }
    Ok(d)
}

async fn run<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    tx: UnboundedSender<Event>,
    mut rx: UnboundedReceiver<Event>,
    settled: oneshot::Sender<()>,
) {
    let dur = match durable(&d.journal, d.unconfirmed.load(Ordering::Relaxed)) {
        Ok(x) => x,
        Err(e) => {
            d.set_fatal(format!("reading the journal for the node machine: {e}"));
            return;
        }
    };
    let (m, first) = NodeMachine::start(machine_config(&d), &dur);
    let mut drv = Driver {
        d,
        tx,
        m,
        generation: 0,
        next_req: 1,
        waiting: HashMap::new(),
        table_failing: Arc::new(AtomicBool::new(false)),
        republish: true,
        settled: Some(settled),
    };
    if !drv.drive(vec![first]).await {
        return;
    }
    drv.tell_settled();
    while let Some(ev) = rx.recv().await {
        let mut outs = Vec::new();
        let mut events = vec![ev];
        // A recovery ends a batch: the outcomes received before it are fed
        // before it waits for the machine to be quiescent (else it would
        // wait for outcomes sitting behind it in this batch).
        while events.len() < ROUND && !matches!(events.last(), Some(Event::Recover(_))) {
            match rx.try_recv() {
                Ok(ev) => events.push(ev),
                Err(_) => break,
            }
        }
        for ev in events {
            match ev {
                Event::Recover(job) => {
                    // Whatever was fed so far is driven first.
                    if !drv.drive(std::mem::take(&mut outs)).await {
                        return;
                    }
                    if !drv.recover(job, &mut rx).await {
                        return;
                    }
                }
                ev => {
                    if let Some(o) = drv.feed(ev) {
                        outs.push(o);
                    }
                }
            }
        }
        if !drv.drive(outs).await {
            return;
        }
        drv.tell_settled();
    }
}

impl<B: Backend, K: KernelOps> Driver<B, K> {
    fn tell_settled(&mut self) {
        if self.m.inflight() == 0 {
            if let Some(s) = self.settled.take() {
                let _ = s.send(());
            }
        }
    }

    fn feed(&mut self, ev: Event) -> Option<Output> {
        match ev {
            Event::Request(r, reply) => {
                let id = self.next_req;
                self.next_req += 1;
                self.waiting.insert(id, reply);
                Some(self.m.request(id, r))
            }
            Event::Done(g, id, outcome) if g == self.generation => Some(self.m.done(id, outcome)),
            Event::Done(..) => None,
            Event::Tick => Some(self.m.tick()),
            Event::Recover(_) => None,
        }
    }

    /// Persist, then act, then answer. False when coild must stop (the
    /// journal cannot commit): nothing of the failed round was acted on.
    async fn drive(&mut self, outs: Vec<Output>) -> bool {
        if outs.is_empty() {
            return true;
        }
        let d = self.d.clone();
        let mut recs: Vec<Rec> = Vec::new();
        let mut sync = false;
        let mut rest = Vec::with_capacity(outs.len());
        for o in outs {
            sync |= o.sync;
            recs.extend(o.persist);
            rest.push((o.effects, o.answers));
        }
        // A fresh reservation's links, which give the pod no address, are
        // made while its batch syncs (a crash leaves at most an
        // addressless veth, which the machine's scan at start removes);
        // its addresses come only after the batch is durable: its gate
        // opens below once the commit returned.
        let mut prepared = HashMap::new();
        for (effects, _) in &rest {
            for (id, e) in effects {
                if let Effect::Wire {
                    key,
                    spec,
                    fresh: true,
                } = e
                {
                    prepared.insert(*id, self.prepare(key, spec.clone()));
                }
            }
        }
        let t0 = Instant::now();
        let nrecs = recs.len();
        if !recs.is_empty() {
            let now = coil::journal::now_unix();
            let mut b = Batch::new();
            for r in &recs {
                match r {
                    Rec::PutIntent(i) if i.created_unix == 0 => {
                        Rec::PutIntent(Intent {
                            created_unix: now,
                            ..i.clone()
                        })
                        .add_to(&mut b);
                    }
                    r => r.add_to(&mut b),
                }
            }
            let committed = if sync {
                d.commit(b).await
            } else {
                d.commit_deferred(b)
            };
            if let Err(e) = committed {
                // The machine believes records that are not durable: it
                // must not act on them. coild stops; the restart rebuilds
                // the machine from what the journal holds.
                d.set_fatal(format!("the node machine's journal commit failed: {e}"));
                // Links made for reservations that are not durable go:
                // each wire removes its own when its gate says so.
                for (_, (gate, rx)) in prepared {
                    let _ = gate.send(false);
                    let _ = rx.await;
                }
                for (_, answers) in rest {
                    for (req, _) in answers {
                        if let Some(w) = self.waiting.remove(&req) {
                            let _ = w.send(Answer::Failed(ErrorKind::TryAgain, e.to_string()));
                        }
                    }
                }
                return false;
            }
            self.persisted(&recs);
        }
        // Durable: the prepared wires may add their addresses.
        let mut prepared: HashMap<EffectId, WireRx> = prepared
            .into_iter()
            .map(|(id, (gate, rx))| {
                let _ = gate.send(true);
                (id, rx)
            })
            .collect();
        let t1 = t0.elapsed();
        self.publish(&recs);
        tracing::debug!(
            outputs = rest.len(),
            records = nrecs,
            sync,
            commit_us = t1.as_micros() as u64,
            publish_us = (t0.elapsed() - t1).as_micros() as u64,
            "round"
        );
        for (effects, answers) in rest {
            // An answer whose event started unwires (a DEL, a GC, a failed
            // wire) waits until their veths are doomed: the pod's interface
            // name is free then, so the runtime's next ADD in the same
            // netns never finds it taken.
            let mut gates = Vec::new();
            for (id, e) in effects {
                let p = prepared.remove(&id);
                if let Some(g) = self.start_effect(id, e, p) {
                    gates.push(g);
                }
            }
            let replies: Vec<(oneshot::Sender<Answer>, Answer)> = answers
                .into_iter()
                .filter_map(|(req, a)| self.waiting.remove(&req).map(|w| (w, a)))
                .collect();
            if gates.is_empty() {
                for (w, a) in replies {
                    let _ = w.send(a);
                }
            } else if !replies.is_empty() {
                tokio::spawn(async move {
                    for g in gates {
                        let _ = tokio::time::timeout(KERNEL_DEADLINE, g).await;
                    }
                    for (w, a) in replies {
                        let _ = w.send(a);
                    }
                });
            }
        }
        true
    }

    /// Starts a fresh reservation's wire: its links at once, its
    /// addresses once the gate returned here is sent true (the
    /// reservation is durable). The wire effect takes the result.
    fn prepare(&self, key: &AttachmentKey, spec: WireSpec) -> (oneshot::Sender<bool>, WireRx) {
        let (gate, durable) = oneshot::channel::<bool>();
        let (tx, rx) = oneshot::channel();
        let d = self.d.clone();
        let ns = d.engine().and_then(|e| e.take_netns::<K::Netns>(key));
        let what = format!("wiring {key}");
        let t = Instant::now();
        // Called here, not in the task: the wire starts now.
        let durable = async move { durable.await.unwrap_or(false) };
        let wire = d.kernel.wire_after(spec, ns, durable);
        tokio::spawn(async move {
            let start_us = t.elapsed().as_micros() as u64;
            let r = deadline(what, wire).await;
            tracing::debug!(
                start_us,
                wire_us = t.elapsed().as_micros() as u64,
                "wire job"
            );
            let _ = tx.send(r);
        });
        (gate, rx)
    }

    /// The failpoints of the records just made durable.
    fn persisted(&self, recs: &[Rec]) {
        for r in recs {
            match r {
                Rec::PutAttachment(a) => match a.state {
                    AttachmentState::Reserved => coil::failpoint::hit("add.reserved"),
                    AttachmentState::Wired => coil::failpoint::hit("add.recorded"),
                    AttachmentState::Releasing => coil::failpoint::hit("del.releasing"),
                },
                Rec::PutIntent(i) => match i.op {
                    IntentOp::AcquireBlock { .. } => coil::failpoint::hit("acquire.intent"),
                    IntentOp::ReleaseBlock { .. } => coil::failpoint::hit("release.intent"),
                    _ => {}
                },
                _ => {}
            }
        }
    }

    /// Makes the machine's allocation what the rest of coild reads (a full
    /// copy after a (re)start, else the round's records applied to it),
    /// and mirrors the changes into the address index, counters and
    /// events.
    fn publish(&mut self, recs: &[Rec]) {
        let d = self.d.clone();
        let mut st = d.lock();
        // After a (re)start the machine's whole state is copied first; the
        // state it replaces still names what this round's records delete
        // (a previous boot's attachments, forgotten at the start), so
        // their index entries are deleted too.
        let before = std::mem::take(&mut self.republish)
            .then(|| std::mem::replace(&mut *st, self.m.state().clone()));
        let mut put = Vec::new();
        let mut deleted = Vec::new();
        let mut lost = Vec::new();
        for r in recs {
            match r {
                Rec::PutAttachment(a) => {
                    if a.state == AttachmentState::Wired {
                        put.push(a.clone());
                    }
                    st.insert_attachment(a.clone());
                }
                Rec::DeleteAttachment(k) => {
                    let gone = st
                        .remove_attachment(k)
                        .or_else(|| before.as_ref().and_then(|b| b.attachment(k).cloned()));
                    if let Some(a) = gone {
                        deleted.push(a);
                    }
                    if let Some(e) = d.engine() {
                        drop(e.take_wired(k));
                    }
                }
                Rec::PutLease(l) => {
                    if l.state == LeaseState::Quarantined && !self.m.removed() {
                        if let Some(b) = st.blocks().find(|b| b.lease.block == l.block) {
                            if b.lease.state != LeaseState::Quarantined {
                                let owner = self
                                    .m
                                    .lost_to(&l.block)
                                    .unwrap_or("this node under another lease, or unknown");
                                lost.push((l.block, b.used.len(), owner.to_string()));
                            }
                        }
                    }
                    st.insert_lease(l.clone());
                }
                Rec::DeleteLease(b) => {
                    st.remove_lease(b);
                }
                _ => {}
            }
        }
        drop(st);
        for a in &put {
            for x in &a.addresses {
                d.mirror(Mirror::Put(d.record(a, x)));
            }
        }
        for a in &deleted {
            for x in &a.addresses {
                d.mirror(Mirror::Delete(d.record(a, x)));
            }
        }
        for (block, pods, owner) in lost {
            d.lease_losses.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%block, pods, %owner,
                "lost the lease of block {block} to {owner}: no new address is taken from it");
            d.cfg.events.emit(crate::kube::NodeEvent::LeaseLost {
                block: block.to_string(),
                owner,
                pods,
            });
        }
        d.set_removed(self.m.removed());
        if !self.m.unconfirmed() && d.unconfirmed.swap(false, Ordering::Relaxed) {
            d.confirm_boot();
        }
        d.store_ok.store(self.m.store_ok(), Ordering::Relaxed);
    }

    /// Starts one effect. For an `Unwire`, returns what resolves once its
    /// veth is doomed (out of the pod's way).
    fn start_effect(
        &self,
        id: EffectId,
        e: Effect,
        prepared: Option<WireRx>,
    ) -> Option<oneshot::Receiver<()>> {
        let d = self.d.clone();
        let tx = self.tx.clone();
        let g = self.generation;
        if let Effect::Unwire { key, host_veth } = e {
            let (netns, ifname) = self
                .m
                .state()
                .attachment(&key)
                .map(|a| (a.netns.clone(), a.key.ifname.clone()))
                .unwrap_or_default();
            let (gate, rx) = oneshot::channel();
            tokio::spawn(async move {
                unwire(&d, &tx, (g, id), &key, &host_veth, &netns, &ifname).await;
                drop(gate);
            });
            return Some(rx);
        }
        // A narrow view reads the blocks the machine knows now.
        let known: Vec<(String, IpNet)> = match &e {
            Effect::View { full: false } => self
                .m
                .state()
                .blocks()
                .map(|b| (b.lease.pool.clone(), b.lease.block))
                .collect(),
            _ => Vec::new(),
        };
        let table_failing = self.table_failing.clone();
        tokio::spawn(async move {
            // Every effect ends within its deadline, so a recovery that
            // waits for the machine to be quiescent waits for all of them.
            let kind = Kind::of(&e);
            let outcome = match tokio::time::timeout(
                EFFECT_DEADLINE,
                effect(&d, e, known, &table_failing, prepared),
            )
            .await
            {
                Ok(o) => o,
                Err(_) => {
                    tracing::warn!(
                        effect = id,
                        ?kind,
                        "an effect took over {EFFECT_DEADLINE:?}; given up"
                    );
                    kind.timed_out()
                }
            };
            let _ = tx.send(Event::Done(g, id, outcome));
        });
        None
    }

    /// Runs recovery with the machine quiescent, then rebuilds the machine
    /// from the journal recovery left. Requests that come meanwhile wait.
    async fn recover(&mut self, job: RecoverJob, rx: &mut UnboundedReceiver<Event>) -> bool {
        let mut held: Vec<Event> = Vec::new();
        // Every effect but an Unwire ends within EFFECT_DEADLINE; an
        // Unwire's doom and delete each have KERNEL_DEADLINE.
        let until = Instant::now() + EFFECT_DEADLINE + Duration::from_secs(2);
        while self.m.inflight() > 0 && Instant::now() < until {
            let ev = match tokio::time::timeout_at(until.into(), rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return false,
                Err(_) => break,
            };
            match ev {
                ev @ Event::Done(..) => {
                    let out = self.feed(ev).into_iter().collect();
                    if !self.drive(out).await {
                        return false;
                    }
                }
                other => held.push(other),
            }
        }
        // Recovery numbers its intents from the journal: past the machine's.
        self.d
            .journal
            .reserve_intent_ids_through(self.m.last_intent());
        let r = self
            .d
            .recover_now(job.dry_run, job.full_scan, job.store_scan)
            .await;
        let _ = job.reply.send(r);
        if !job.dry_run {
            let dur = match durable(&self.d.journal, self.d.unconfirmed.load(Ordering::Relaxed)) {
                Ok(x) => x,
                Err(e) => {
                    self.d
                        .set_fatal(format!("reading the journal for the node machine: {e}"));
                    return false;
                }
            };
            let (m, first) = NodeMachine::start(machine_config(&self.d), &dur);
            self.m = m;
            self.generation += 1;
            self.republish = true;
            if let Some(e) = self.d.engine() {
                e.generation.store(self.generation, Ordering::Relaxed);
            }
            // Requests the old machine held were answered (or their
            // effects timed out): those left get a retry.
            for (_, w) in self.waiting.drain() {
                let _ = w.send(Answer::Failed(
                    ErrorKind::TryAgain,
                    "coild ran recovery meanwhile; retry".into(),
                ));
            }
            if !self.drive(vec![first]).await {
                return false;
            }
        }
        for ev in held {
            match ev {
                Event::Recover(j) => {
                    let _ = j.reply.send(Err(DaemonError::Busy(
                        "another recovery ran meanwhile; retry".into(),
                    )));
                }
                ev => {
                    let out = self.feed(ev).into_iter().collect();
                    if !self.drive(out).await {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// How long one effect may take, whatever it waits on (a non-fresh wire
/// checks, reads and wires, each under [`KERNEL_DEADLINE`]).
pub(super) const EFFECT_DEADLINE: Duration = KERNEL_DEADLINE;

/// The kind of an effect, as far as its deadline cares: taken before the
/// effect runs (it is moved into its task), turned into an outcome only
/// when the deadline passes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Wire,
    Unwire,
    Store,
    Route,
    Observe,
    Scan,
}

impl Kind {
    fn of(e: &Effect) -> Kind {
        match e {
            Effect::Wire { .. } => Kind::Wire,
            Effect::Unwire { .. } => Kind::Unwire,
            Effect::Acquire { .. }
            | Effect::Reacquire { .. }
            | Effect::Release { .. }
            | Effect::View { .. } => Kind::Store,
            Effect::Export { .. } | Effect::Withdraw { .. } | Effect::ReadTable => Kind::Route,
            Effect::Observe { .. } => Kind::Observe,
            Effect::Scan | Effect::RemoveLink { .. } | Effect::RemoveHostRoute { .. } => Kind::Scan,
        }
    }

    /// What an effect that ran out of time reports: what a failure of its
    /// kind reports (the world may be half way; each effect is idempotent).
    fn timed_out(self) -> Outcome {
        let why = format!("timed out after {EFFECT_DEADLINE:?}");
        match self {
            Kind::Wire => Outcome::WireTimedOut,
            Kind::Unwire => Outcome::WireFailed(ErrorKind::Kernel, why),
            Kind::Store => Outcome::Unavailable,
            Kind::Route => Outcome::RouteFailed(why),
            Kind::Observe => Outcome::Observed(Vec::new()),
            Kind::Scan => Outcome::RemoveFailed(why),
        }
    }
}

/// Runs one effect against the kernel or the store. Every effect is
/// idempotent; its failpoint fires after it took effect.
async fn effect<B: Backend, K: KernelOps>(
    d: &Daemon<B, K>,
    e: Effect,
    known: Vec<(String, IpNet)>,
    table_failing: &AtomicBool,
    prepared: Option<WireRx>,
) -> Outcome {
    let node = d.cfg.node_name.as_str();
    match e {
        Effect::Acquire { pool, family } => {
            d.add_store_calls.fetch_add(1, Ordering::Relaxed);
            match d.store.acquire_block_of(&pool, Some(family), node).await {
                Ok(l) => {
                    coil::failpoint::hit("acquire.leased");
                    tracing::info!(pool, block = %l.block, epoch = l.epoch, "leased a block");
                    Outcome::Acquired(journal_lease(&l))
                }
                Err(StoreError::Exhausted { .. }) => Outcome::Exhausted,
                Err(StoreError::NodeRemoved { .. }) => Outcome::Fenced,
                Err(e) => {
                    tracing::warn!(pool, %family, "leasing a block: {e}");
                    Outcome::Unavailable
                }
            }
        }
        Effect::Reacquire { lease } => {
            match d
                .store
                .acquire_specific(&lease.pool, lease.block, node)
                .await
            {
                Ok(l) => Outcome::Acquired(BlockLease {
                    epoch: u64::try_from(l.epoch).unwrap_or(0),
                    state: LeaseState::Leased,
                    ..lease
                }),
                Err(StoreError::NotOwner { owner, .. }) => Outcome::Taken { owner },
                Err(e) if e.is_corrupt() => Outcome::Taken {
                    owner: format!("unknown (the store's entry is malformed: {e})"),
                },
                Err(StoreError::NodeRemoved { .. }) => Outcome::Fenced,
                Err(e) => {
                    tracing::warn!(block = %lease.block, "re-leasing a block: {e}");
                    Outcome::Unavailable
                }
            }
        }
        Effect::Release { lease } => {
            let cur = match d.store.block(lease.block).await {
                Ok((_, cur)) => cur,
                // A malformed value is not a lease we can prove is ours.
                Err(e) if e.is_corrupt() => None,
                Err(e) => {
                    tracing::warn!(block = %lease.block, "reading a block to release it: {e}");
                    return Outcome::Unavailable;
                }
            };
            match cur {
                Some(c) if c.node == node && u64::try_from(c.epoch).ok() == Some(lease.epoch) => {
                    match d.store.release_block(&c).await {
                        Ok(()) => {
                            coil::failpoint::hit("release.released");
                            tracing::info!(block = %lease.block, "released an idle block");
                            Outcome::Released
                        }
                        Err(e) => {
                            tracing::warn!(block = %lease.block, "releasing a block: {e}");
                            Outcome::Unavailable
                        }
                    }
                }
                // Gone, or not this incarnation: nothing to release.
                _ => Outcome::Released,
            }
        }
        Effect::Wire { key, spec, fresh } => {
            // A restarted or retried wire adopts a complete wiring of this
            // attachment instead of replacing it under a running pod.
            if !fresh {
                if let Ok(diffs) = deadline(format!("checking {key}"), d.kernel.check(&spec)).await
                {
                    if diffs.is_empty() {
                        if let Ok(w) =
                            deadline(format!("reading {key}"), d.kernel.wire_info(&spec)).await
                        {
                            coil::failpoint::hit("add.wired");
                            if let Some(e) = d.engine() {
                                e.put_wired(key, w);
                            }
                            return Outcome::Wired;
                        }
                    }
                }
            }
            let wiring = async {
                match prepared {
                    Some(rx) => match rx.await {
                        Ok(r) => r,
                        // The wiring task died: wire from scratch.
                        Err(_) => d.kernel.wire_in(&spec, None).await,
                    },
                    None => {
                        let ns = d.engine().and_then(|e| e.take_netns::<K::Netns>(&key));
                        d.kernel.wire_in(&spec, ns).await
                    }
                }
            };
            match deadline(format!("wiring {key}"), wiring).await {
                Ok(w) => {
                    coil::failpoint::hit("add.wired");
                    if let Some(e) = d.engine() {
                        e.put_wired(key, w);
                    }
                    Outcome::Wired
                }
                Err(KernelError::Timeout(..)) => Outcome::WireTimedOut,
                Err(e) => {
                    let why = e.to_string();
                    Outcome::WireFailed(DaemonError::Kernel(e).kind(), why)
                }
            }
        }
        Effect::Unwire { key, host_veth } => unwire_now(d, &key, &host_veth).await,
        Effect::View { full } => view(d, node, full, known).await,
        Effect::Observe { attachments } => observe(d, attachments).await,
        Effect::Scan => scan(d).await,
        Effect::RemoveLink { name } => {
            match deadline(format!("removing link {name}"), d.kernel.unwire(&name)).await {
                Ok(_) => {
                    tracing::info!(link = %name, "removed a coil link no attachment owns");
                    Outcome::Removed
                }
                Err(e) => {
                    tracing::warn!(link = %name, "removing a coil link no attachment owns: {e}");
                    Outcome::RemoveFailed(e.to_string())
                }
            }
        }
        Effect::RemoveHostRoute { dst, dev, oif } => {
            match deadline(
                format!("removing host route {dst} dev {dev}"),
                d.kernel.del_host_route(dst, oif),
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(%dst, %dev, "removed a coil host route no address owns");
                    Outcome::Removed
                }
                Err(e) => {
                    tracing::warn!(%dst, %dev, "removing a stray coil host route: {e}");
                    Outcome::RemoveFailed(e.to_string())
                }
            }
        }
        Effect::Export { block } => match d.kernel.export_block(block).await {
            Ok(()) => Outcome::Routed,
            Err(e) => {
                tracing::warn!(%block, "publishing in table {}: {e}", d.cfg.table_id);
                Outcome::RouteFailed(e.to_string())
            }
        },
        Effect::Withdraw { block } => match d.kernel.withdraw_block(block).await {
            Ok(()) => Outcome::Routed,
            Err(e) => {
                tracing::warn!(%block, "withdrawing from table {}: {e}", d.cfg.table_id);
                Outcome::RouteFailed(e.to_string())
            }
        },
        Effect::ReadTable => {
            // The machine asks again at once after a failure: pace it.
            if table_failing.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match d.kernel.exported_blocks().await {
                Ok(v) => {
                    table_failing.store(false, Ordering::Relaxed);
                    Outcome::Table(v.into_iter().collect())
                }
                Err(e) => {
                    table_failing.store(true, Ordering::Relaxed);
                    tracing::warn!("reading table {}: {e}", d.cfg.table_id);
                    Outcome::RouteFailed(e.to_string())
                }
            }
        }
    }
}

/// coil's links (name `coil…`, with their alias) and its host routes
/// through them, for the machine to find what no attachment owns. A read
/// that fails reports a failure (nothing is removed on a guess).
async fn scan<B: Backend, K: KernelOps>(d: &Daemon<B, K>) -> Outcome {
    let (links, routes) = match listing(d).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("listing coil's links and host routes: {e}");
            return Outcome::RemoveFailed(e.to_string());
        }
    };
    let links: Vec<(u32, String, Option<String>)> = links
        .into_iter()
        .filter(|(_, n, _)| n.starts_with("coil"))
        .collect();
    let ours: HashMap<u32, &str> = links.iter().map(|(i, n, _)| (*i, n.as_str())).collect();
    let routes = routes
        .into_iter()
        .filter_map(|(dst, oif)| ours.get(&oif).map(|n| (dst, n.to_string(), oif)))
        .collect();
    Outcome::Scanned {
        routes,
        links: links.into_iter().map(|(_, n, a)| (n, a)).collect(),
    }
}

/// Every link of coild's netns (index, name, alias) and coil's host
/// routes (destination, output link's index): what `scan` and `observe`
/// look at.
#[allow(clippy::type_complexity)]
async fn listing<B: Backend, K: KernelOps>(
    d: &Daemon<B, K>,
) -> Result<(Vec<(u32, String, Option<String>)>, Vec<(IpNet, u32)>), KernelError> {
    Ok((d.kernel.links().await?, d.kernel.host_routes().await?))
}

/// Which of these wired attachments lack their veth or a host route to
/// one of their addresses, each with whether its pod netns still exists.
/// A read that fails reports nothing missing (nothing is done on a guess).
async fn observe<B: Backend, K: KernelOps>(d: &Daemon<B, K>, atts: Vec<Attachment>) -> Outcome {
    let (links, routes) = match listing(d).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("looking at the pods' veths: {e}");
            return Outcome::Observed(Vec::new());
        }
    };
    let index: HashMap<&str, u32> = links.iter().map(|(i, n, _)| (n.as_str(), *i)).collect();
    let routes: BTreeSet<(IpNet, u32)> = routes.into_iter().collect();
    let broken: Vec<&Attachment> = atts
        .iter()
        .filter(|a| match index.get(a.host_veth.as_str()) {
            None => true,
            Some(i) => !a
                .addresses
                .iter()
                .all(|x| routes.contains(&(IpNet::from(x.addr), *i))),
        })
        .collect();
    if broken.is_empty() {
        return Outcome::Observed(Vec::new());
    }
    let live = d
        .kernel
        .live_netns(broken.iter().map(|a| a.netns.clone()).collect())
        .await;
    for a in &broken {
        tracing::warn!(attachment = %a.key, netns_alive = live.contains(&a.netns),
            "the pod's veth or host routes are gone");
    }
    Outcome::Observed(
        broken
            .iter()
            .map(|a| (a.key.clone(), live.contains(&a.netns)))
            .collect(),
    )
}

/// The store's view of this node: its leases and whether it is fenced.
/// Narrow (the blocks the machine knows, one transaction) unless `full`.
async fn view<B: Backend, K: KernelOps>(
    d: &Daemon<B, K>,
    node: &str,
    full: bool,
    known: Vec<(String, IpNet)>,
) -> Outcome {
    if validate_node_name(node).is_err() {
        return Outcome::Unavailable;
    }
    let to_map = |ls: Vec<coil::store::BlockLease>| -> BTreeMap<IpNet, (String, u64)> {
        ls.into_iter()
            .filter(|l| l.node == node)
            .map(|l| {
                (
                    l.block,
                    (l.pool.clone(), u64::try_from(l.epoch).unwrap_or(0)),
                )
            })
            .collect()
    };
    if !full {
        match d.store.node_view(node, &known).await {
            Ok(Some(v)) => {
                return Outcome::View {
                    leases: to_map(v.leases),
                    fenced: v.removed,
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!("reading the store's view of this node: {e}");
                return Outcome::Unavailable;
            }
        }
    }
    let listed = d.store.node_blocks_checked(node).await;
    let fence = d.store.removal(node).await;
    match (listed, fence) {
        (Ok(l), Ok(f)) => Outcome::View {
            leases: to_map(l.items),
            fenced: f.is_some(),
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!("reading the store's view of this node: {e}");
            Outcome::Unavailable
        }
    }
}

/// Removes one veth now (the unbatched path).
async fn unwire_now<B: Backend, K: KernelOps>(
    d: &Daemon<B, K>,
    key: &AttachmentKey,
    host_veth: &str,
) -> Outcome {
    match deadline(format!("unwiring {key}"), d.kernel.unwire(host_veth)).await {
        Ok(_) => {
            coil::failpoint::hit("del.unwired");
            Outcome::Unwired
        }
        Err(e) => {
            tracing::warn!(attachment = %key, "removing {host_veth}: {e}");
            Outcome::WireFailed(ErrorKind::Kernel, e.to_string())
        }
    }
}

/// An `Unwire`: the veth is doomed now (its pod end renamed, so the
/// interface name is free; the host end down) and deleted by the batched
/// teardown, whose completion answers the effect. A veth already gone is
/// done at once; one that cannot be doomed is deleted now.
async fn unwire<B: Backend, K: KernelOps>(
    d: &Daemon<B, K>,
    tx: &UnboundedSender<Event>,
    (g, id): (u64, EffectId),
    key: &AttachmentKey,
    host_veth: &str,
    netns: &str,
    ifname: &str,
) {
    let doomed = deadline(
        format!("dooming the veth of {key}"),
        d.kernel.doom(host_veth, netns, ifname),
    )
    .await;
    let outcome = match doomed {
        Ok(true) => {
            let queued = d
                .engine()
                .map(|e| e.doomed.try_send((host_veth.to_string(), g, id)));
            match queued {
                Some(Ok(())) => return,
                _ => unwire_now(d, key, host_veth).await,
            }
        }
        Ok(false) => {
            coil::failpoint::hit("del.unwired");
            Outcome::Unwired
        }
        Err(e) => {
            if !d.engine().is_some_and(|e| e.current(g)) {
                return;
            }
            tracing::warn!(attachment = %key, "dooming its veth: {e}; deleting it now");
            unwire_now(d, key, host_veth).await
        }
    };
    let _ = tx.send(Event::Done(g, id, outcome));
}

/// Deletes doomed veths in one kernel request when requests pause (or the
/// batch is full, or its oldest waited a second), so one RCU grace period
/// covers many and no ADD waits behind a teardown; then answers each
/// `Unwire`. The addresses are freed only then, by the machine.
async fn teardown<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    tx: UnboundedSender<Event>,
    rx: mpsc::Receiver<Doomed>,
) {
    let dd = d.clone();
    release::in_batches(&d, rx, move |done| {
        let (d, tx) = (dd.clone(), tx.clone());
        async move {
            match deadline("deleting doomed veths", d.kernel.delete_doomed()).await {
                Ok(()) => {
                    coil::failpoint::hit("del.unwired");
                    for (_, g, id) in done {
                        let _ = tx.send(Event::Done(g, id, Outcome::Unwired));
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        count = done.len(),
                        "batched veth teardown: {e}; one by one instead"
                    );
                    for (veth, g, id) in done {
                        if !d.engine().is_some_and(|e| e.current(g)) {
                            continue;
                        }
                        let key = AttachmentKey::new("-", &veth, "-");
                        let outcome = unwire_now(&d, &key, &veth).await;
                        let _ = tx.send(Event::Done(g, id, outcome));
                    }
                }
            }
        }
    })
    .await
}
