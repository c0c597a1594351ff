//! ADD: reserve an address of each family, make it durable, wire the pod, answer.

use super::*;

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    pub(super) fn spec(&self, a: &Attachment) -> WireSpec {
        coil::node::wire_spec(a, self.cfg.mtu)
    }

    pub(super) fn result(&self, a: &Attachment, host_mac: String, pod_mac: String) -> AddResult {
        let ips = a
            .addresses
            .iter()
            .map(|x| IpConfig {
                address: IpNet::new(x.addr, if x.addr.is_ipv4() { 32 } else { 128 })
                    .unwrap_or_else(|_| IpNet::from(x.addr)),
                gateway: gateway_for(&x.addr),
                interface: 1,
            })
            .collect();
        let mut routes = Vec::new();
        for fam_v4 in [true, false] {
            if let Some(x) = a.addresses.iter().find(|x| x.addr.is_ipv4() == fam_v4) {
                let dst: IpNet = if fam_v4 {
                    IpNet::V4(ipnet::Ipv4Net::default())
                } else {
                    IpNet::V6(ipnet::Ipv6Net::default())
                };
                routes.push(Route {
                    dst,
                    gw: gateway_for(&x.addr),
                });
            }
        }
        AddResult {
            interfaces: vec![
                Interface {
                    name: a.host_veth.clone(),
                    mac: host_mac,
                    sandbox: None,
                },
                Interface {
                    name: a.key.ifname.clone(),
                    mac: pod_mac,
                    sandbox: Some(a.netns.clone()),
                },
            ],
            ips,
            routes,
        }
    }

    pub(super) async fn add(self: &Arc<Self>, req: &Request) -> DResult<AddResult> {
        let t0 = Instant::now();
        if self.removed.load(Ordering::Relaxed) {
            // Its old blocks may be another node's now: serve no address.
            return Err(DaemonError::Store(StoreError::NodeRemoved {
                node: self.cfg.node_name.clone(),
            }));
        }
        if self.unconfirmed.load(Ordering::Relaxed) {
            return Err(DaemonError::Busy(
                "this node rebooted and the cluster store has not yet confirmed its blocks \
                 (a node removed while powered off must not serve from them); retry when \
                 the store answers"
                    .into(),
            ));
        }
        let key = request_key(req);
        let netns = req.netns.clone().unwrap_or_default();
        let existing = self.lock().lookup(&key).cloned();
        // The checked pod netns, opened once for the check and the wiring.
        let mut opened: Option<K::Netns> = None;
        let rewire = matches!(&existing, Some(a) if a.state == AttachmentState::Reserved);
        // A new reservation's wiring spec and links, made while its
        // journal write syncs.
        let mut prepared: Option<(WireSpec, Result<K::Prepared, KernelError>)> = None;
        let (att, intent) = match existing {
            Some(a) if a.state == AttachmentState::Wired => {
                // A repeated ADD: the same answer, nothing changed.
                let w = deadline(
                    format!("reading the wiring of {}", a.key),
                    self.kernel.wire_info(&self.spec(&a)),
                )
                .await?;
                return Ok(self.result(&a, w.host_mac, w.pod_mac));
            }
            Some(a) if a.state == AttachmentState::Releasing => {
                return Err(DaemonError::Busy(format!(
                    "attachment {key} is being deleted; retry the ADD"
                )))
            }
            Some(a) => {
                // Reserved but never wired (an earlier ADD failed after its
                // journal write): wire it now with the same address.
                let id = self.journal.next_intent_id();
                (a, id)
            }
            None => {
                // Before anything is reserved: the path must be a pod's own
                // network namespace (never coild's or the host's).
                opened = Some(self.kernel.open_pod_netns(&netns).await?);
                let (pool, families) = self.pool_for(req.pod.namespace.as_deref()).await?;
                // One address of each family, or none: a family that cannot
                // be served gives back what the others reserved.
                let mut resvs: Vec<Reservation> = Vec::with_capacity(families.len());
                for family in families {
                    let r = loop {
                        if let Some(r) = self.lock().reserve(&pool, family) {
                            break r;
                        }
                        if let Err(e) = self.acquire_block(&pool, family).await {
                            let mut st = self.lock();
                            for r in &resvs {
                                st.unreserve(r);
                            }
                            if let DaemonError::Store(StoreError::Exhausted {
                                pool, family, ..
                            }) = &e
                            {
                                self.cfg.events.emit(crate::kube::NodeEvent::PoolExhausted {
                                    pool: pool.clone(),
                                    family: family.to_string(),
                                });
                            }
                            return Err(e);
                        }
                    };
                    resvs.push(r);
                }
                let att = Attachment {
                    key: key.clone(),
                    netns: netns.clone(),
                    pod_namespace: req.pod.namespace.clone().unwrap_or_default(),
                    pod_name: req.pod.name.clone().unwrap_or_default(),
                    pool: pool.clone(),
                    addresses: resvs
                        .iter()
                        .map(|r| AssignedAddress {
                            addr: r.addr,
                            block: r.block,
                        })
                        .collect(),
                    host_veth: host_veth_name(&key),
                    state: AttachmentState::Reserved,
                    boot_id: self.boot_id.clone(),
                    created_unix: coil::journal::now_unix(),
                };
                if coil::planted::on(coil::planted::Bug::WireBeforeIntent) {
                    // Planted (tests only): the kernel before the journal.
                    if let Err(e) = self.kernel.wire_in(&self.spec(&att), opened.take()).await {
                        let mut st = self.lock();
                        for r in &resvs {
                            st.unreserve(r);
                        }
                        return Err(e.into());
                    }
                    coil::failpoint::hit("add.wired");
                }
                let id = self.journal.next_intent_id();
                let mut b = Batch::new();
                b.put_intent(&Intent {
                    id,
                    op: IntentOp::Wire { key: key.clone() },
                    state: IntentState::Pending,
                    created_unix: att.created_unix,
                })
                .put_attachment(&att);
                for r in &resvs {
                    b.put_address(
                        r.addr,
                        &AddressEntry {
                            attachment: key.clone(),
                            block: r.block,
                        },
                    )
                    .put_lease(&r.lease);
                }
                // The links and routes that give the pod no address are
                // made while the reservation is synced: nothing reachable
                // exists before it is durable (a crash leaves at most an
                // addressless veth, which recovery or the next ADD of the
                // attachment replaces). The addresses come after.
                let spec = self.spec(&att);
                let (committed, links) = tokio::join!(
                    self.commit(b),
                    deadline(
                        format!("wiring {key}"),
                        self.kernel.prepare_in(&spec, opened.take())
                    )
                );
                if let Err(e) = committed {
                    if links.is_ok() {
                        let _ = self.kernel.unwire(&att.host_veth).await;
                    }
                    let mut st = self.lock();
                    for r in &resvs {
                        st.unreserve(r);
                    }
                    return Err(e);
                }
                self.lock().insert_attachment(att.clone());
                coil::failpoint::hit("add.reserved");
                prepared = Some((spec, links));
                (att, id)
            }
        };
        // From here on the record's own key (a format-1 record keeps its).
        let key = att.key.clone();
        let t1 = t0.elapsed();
        let (spec, prepared) = match prepared {
            Some((spec, links)) => (spec, Some(links)),
            None => (self.spec(&att), None),
        };
        // A retried ADD of a reservation whose wire finished after its
        // deadline finds the pod wired: adopt it, as recovery does, and
        // leave the running interface alone.
        let complete = rewire
            && matches!(
                deadline(format!("checking {key}"), self.kernel.check(&spec)).await,
                Ok(d) if d.is_empty()
            );
        let wiring = async {
            match prepared {
                Some(Ok(p)) => self.kernel.finish_in(&spec, p).await,
                Some(Err(e)) => Err(e),
                None if complete => self.kernel.wire_info(&spec).await,
                None => self.kernel.wire_in(&spec, opened).await,
            }
        };
        let wired = match deadline(format!("wiring {key}"), wiring).await {
            Ok(w) => w,
            Err(e @ KernelError::Timeout(..)) => {
                // The kernel may be half way: keep the reservation and its
                // pending intent; a retried ADD wires it again (replacing
                // what is there) and recovery settles it otherwise.
                return Err(e.into());
            }
            Err(e) => {
                // Undo: the kernel left nothing (wire cleans up after
                // itself); free the reservation in the journal, then here.
                let mut b = Batch::new();
                b.delete_attachment(&key).delete_intent(intent);
                for x in &att.addresses {
                    b.delete_address(x.addr);
                }
                self.commit(b).await?;
                self.lock().remove_attachment(&key);
                return Err(e.into());
            }
        };
        let done = Attachment {
            state: AttachmentState::Wired,
            ..att
        };
        let mut b = Batch::new();
        b.put_attachment(&done).delete_intent(intent);
        coil::failpoint::hit("add.wired");
        let t2 = t0.elapsed();
        // Written, not waited for: the durable Reserved record and its Wire
        // intent already make recovery keep this pod (it adopts the wiring);
        // see "Which record must be durable before the answer" in
        // docs/ARCHITECTURE.md.
        self.commit_deferred(b)?;
        self.lock().insert_attachment(done.clone());
        tracing::debug!(
            attachment = %key,
            reserve_us = t1.as_micros() as u64,
            wire_us = (t2 - t1).as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "ADD"
        );
        coil::failpoint::hit("add.recorded");
        for x in &done.addresses {
            self.mirror(Mirror::Put(self.record(&done, x)));
        }
        Ok(self.result(&done, wired.host_mac, wired.pod_mac))
    }
}
