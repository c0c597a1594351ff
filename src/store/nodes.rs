//! Nodes: liveness registration, removal with its fence, re-admission.

use super::*;

impl<B: Backend> Store<B> {
    // ------------------------------------------------------------ nodes

    /// Registers `rec` under a fresh lease of `ttl_secs`; returns the lease
    /// to keep alive with [`Store::keep_alive`].
    pub async fn register_node(&self, rec: &NodeRecord, ttl_secs: i64) -> Result<i64> {
        model::validate_node_name(&rec.node)?;
        let lease = self.backend.lease_grant(ttl_secs).await?;
        let txn = Txn {
            when: vec![],
            then: vec![Op::Put {
                key: self.keys.node(&rec.node).into_bytes(),
                value: encode(rec),
                lease,
            }],
            otherwise: vec![],
        };
        self.backend.txn("register node", txn).await?;
        Ok(lease)
    }

    /// Renews the liveness lease; false when it already expired (the node
    /// must register again).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool> {
        Ok(self.backend.lease_keep_alive(lease).await? > 0)
    }

    /// Withdraws a node's liveness (clean shutdown).
    pub async fn deregister_node(&self, lease: i64) -> Result<()> {
        Ok(self.backend.lease_revoke(lease).await?)
    }

    /// The liveness record of `node`, if it is alive;
    /// [`StoreError::Corrupt`] if its entry is bad.
    pub async fn node(&self, node: &str) -> Result<Option<NodeRecord>> {
        match self.read_one("get node", self.keys.node(node)).await? {
            None => Ok(None),
            Some(kv) => read_node(&self.keys, &kv)
                .map(Some)
                .map_err(|b| self.refuse(b)),
        }
    }

    /// Every node that is alive or holds a valid lease (bad entries are
    /// skipped, counted and logged).
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        Ok(self.logged("list nodes", self.nodes_checked().await?))
    }

    /// Every node that is alive or holds a valid lease, and the bad entries
    /// under `nodes/` and `blocks/`. A node whose liveness entry is bad is
    /// not listed as alive (its key still fences the controller off its
    /// blocks: the controller frees blocks only of nodes without one).
    pub async fn nodes_checked(&self) -> Result<Listing<NodeStatus>> {
        let mut r = self
            .backend
            .txn(
                "list nodes",
                Txn::read(vec![
                    Op::prefix(&self.keys.nodes()),
                    Op::prefix(&self.keys.blocks()),
                    Op::prefix(&self.keys.pools()),
                    Op::prefix(&self.keys.removed_prefix()),
                    Op::prefix(&self.keys.unreachable_prefix()),
                ]),
            )
            .await?;
        let pools = pools_by_name(&self.keys, &r.kvs(2));
        let removed = self.sift(&r.kvs(3), |kv| {
            read_keyed::<RemovalRecord>(kv, &self.keys.removed_prefix(), |v| &v.node)
        });
        let unreachable = self.sift(&r.kvs(4), |kv| {
            read_keyed::<UnreachableRecord>(kv, &self.keys.unreachable_prefix(), |v| &v.node)
        });
        let records = self.sift(&r.kvs(0), |kv| read_node(&self.keys, kv));
        let leases = self.sift(&r.kvs(1), |kv| read_lease_in(&self.keys, kv, &pools));
        let mut out: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for rec in records.items {
            out.insert(
                rec.node.clone(),
                NodeStatus {
                    node: rec.node,
                    alive: true,
                    boot_id: Some(rec.boot_id),
                    started_unix: Some(rec.started_unix),
                    blocks: 0,
                    unreachable_since: None,
                    removed: None,
                },
            );
        }
        for l in leases.items {
            out.entry(l.node.clone())
                .or_insert_with(|| NodeStatus::gone(&l.node))
                .blocks += 1;
        }
        for u in unreachable.items {
            if let Some(n) = out.get_mut(&u.node) {
                if !n.alive {
                    n.unreachable_since = Some(u.since_unix);
                }
            }
        }
        for rm in removed.items {
            let node = rm.node.clone();
            out.entry(node.clone())
                .or_insert_with(|| NodeStatus::gone(&node))
                .removed = Some(rm);
        }
        let mut bad = records.bad;
        bad.extend(leases.bad);
        bad.extend(removed.bad);
        bad.extend(unreachable.bad);
        Ok(Listing {
            items: out.into_values().collect(),
            bad,
        })
    }

    // ------------------------------------------------- removal and fences

    /// The node's removal fence, if it has one.
    pub async fn removal(&self, node: &str) -> Result<Option<RemovalRecord>> {
        model::validate_node_name(node)?;
        let key = self.keys.removed(node);
        let mut r = self
            .backend
            .txn("read removal fence", Txn::read(vec![Op::get(key.clone())]))
            .await?;
        match r.kvs(0).first() {
            None => Ok(None),
            Some(kv) => read_keyed::<RemovalRecord>(kv, &self.keys.removed_prefix(), |v| &v.node)
                .map(Some)
                .map_err(|b| self.refuse(b)),
        }
    }

    /// Removes a node from the cluster on proof that its pods are gone (an
    /// operator's word, or its Kubernetes Node deleted): in one transaction
    /// it records the node's removal fence and frees every block the node
    /// leases, each fenced on its incarnation (create revision and value),
    /// on the node's liveness key being absent unless `force`, and on
    /// `leader` still leading when the controller does it. The fence keeps
    /// the node from leasing anything, and its coild from serving its old
    /// blocks, until `readmit_node`. Idempotent: a removed node is removed
    /// again with whatever it holds now.
    pub async fn remove_node(
        &self,
        node: &str,
        reason: &str,
        force: bool,
        leader: Option<&str>,
    ) -> Result<RemovalRecord> {
        model::validate_node_name(node)?;
        self.optimistic("remove node", &self.keys.removed(node), || async {
            let mut r = self
                .backend
                .txn(
                    "read node for removal",
                    Txn::read(vec![
                        Op::get(self.keys.node(node)),
                        Op::prefix(&self.keys.blocks()),
                        Op::prefix(&self.keys.pools()),
                    ]),
                )
                .await?;
            let alive = !r.kvs(0).is_empty();
            if alive && !force {
                return Err(StoreError::NodeAlive {
                    node: node.to_string(),
                });
            }
            let pools = pools_by_name(&self.keys, &r.kvs(2));
            let listed = self.sift(&r.kvs(1), |kv| read_lease_in(&self.keys, kv, &pools));
            for b in &listed.bad {
                self.log_bad("remove node", b);
            }
            let mine: Vec<BlockLease> = listed
                .items
                .into_iter()
                .filter(|l| l.node == node)
                .collect();
            let rec = RemovalRecord {
                node: node.to_string(),
                removed_unix: now_unix(),
                reason: reason.to_string(),
                blocks: mine.iter().map(|l| l.block).collect(),
            };
            let mut when = vec![self.schema_guard()];
            if !force {
                when.push(Cmp::CreateRevision {
                    key: self.keys.node(node).into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                });
            }
            if let Some(l) = leader {
                when.push(self.leader_guard(l));
            }
            let mut then = vec![
                Op::put(self.keys.removed(node), encode(&rec)),
                Op::Delete {
                    key: self.keys.unreachable(node).into_bytes(),
                },
            ];
            for l in &mine {
                let t = self.release_txn(l, vec![]);
                when.extend(t.when.into_iter().filter(|c| {
                    !matches!(c, Cmp::ValueEquals { key, .. } if key == &self.keys.schema().into_bytes())
                }));
                then.extend(t.then);
            }
            let txn = Txn {
                when,
                then,
                otherwise: vec![],
            };
            if self.backend.txn("remove node", txn).await?.succeeded {
                return Ok(Try::Done(rec));
            }
            if let Some(l) = leader {
                if self.leader().await?.as_deref() != Some(l) {
                    return Err(StoreError::Invalid(format!(
                        "{l} no longer leads the controller"
                    )));
                }
            }
            Ok(Try::Lost)
        })
        .await
    }

    /// Lifts a node's removal fence (`coilctl node readmit`): the node may
    /// lease blocks again. Its coild drops the quarantined old blocks once
    /// their pods are gone. Refused while the node still holds a block (it
    /// cannot, unless a lease predates the fence).
    pub async fn readmit_node(&self, node: &str) -> Result<bool> {
        model::validate_node_name(node)?;
        let held = self.node_blocks(node).await?;
        if !held.is_empty() {
            return Err(StoreError::Invalid(format!(
                "node {node} still holds {} block(s); remove it again first",
                held.len()
            )));
        }
        let key = self.keys.removed(node);
        let txn = Txn {
            when: vec![self.schema_guard()],
            then: vec![Op::Delete {
                key: key.into_bytes(),
            }],
            otherwise: vec![],
        };
        let mut r = self.backend.txn("readmit node", txn).await?;
        Ok(matches!(r.results.first_mut(), Some(backend::OpResult::Deleted(n)) if *n > 0))
    }

    /// The controller notes that `node` (holding blocks) has no liveness
    /// since `since_unix`, once; fenced on leadership and on the node
    /// still being without liveness.
    pub async fn note_unreachable(&self, node: &str, since_unix: u64, leader: &str) -> Result<()> {
        let rec = UnreachableRecord {
            node: node.to_string(),
            since_unix,
        };
        let key = self.keys.unreachable(node);
        let txn = Txn {
            when: vec![
                self.leader_guard(leader),
                Cmp::CreateRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                Cmp::CreateRevision {
                    key: self.keys.node(node).into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
            ],
            then: vec![Op::put(key, encode(&rec))],
            otherwise: vec![],
        };
        self.backend.txn("note unreachable node", txn).await?;
        Ok(())
    }

    /// The controller clears the note of a node that is back (or gone).
    pub async fn clear_unreachable(&self, node: &str, leader: &str) -> Result<()> {
        let txn = Txn {
            when: vec![self.leader_guard(leader)],
            then: vec![Op::Delete {
                key: self.keys.unreachable(node).into_bytes(),
            }],
            otherwise: vec![],
        };
        self.backend.txn("clear unreachable note", txn).await?;
        Ok(())
    }
}
