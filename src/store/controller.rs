//! The controller's reads and writes: leadership, the node view, unreachable notes.

use super::*;

impl<B: Backend> Store<B> {
    // --------------------------------------------------------- controller

    /// Tries to become the controller leader: the leader key is created
    /// only if absent, bound to a fresh lease of `ttl_secs`. Returns the
    /// lease to keep alive when elected, None when another replica leads.
    pub async fn campaign(&self, identity: &str, ttl_secs: i64) -> Result<Option<i64>> {
        let lease = self.backend.lease_grant(ttl_secs).await?;
        let key = self.keys.leader();
        let txn = Txn {
            when: vec![Cmp::CreateRevision {
                key: key.clone().into_bytes(),
                op: CmpOp::Equal,
                rev: 0,
            }],
            then: vec![Op::Put {
                key: key.into_bytes(),
                value: identity.as_bytes().to_vec(),
                lease,
            }],
            otherwise: vec![],
        };
        if self.backend.txn("campaign", txn).await?.succeeded {
            Ok(Some(lease))
        } else {
            self.backend.lease_revoke(lease).await?;
            Ok(None)
        }
    }

    /// The current leader's identity.
    pub async fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .read_one("get leader", self.keys.leader())
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    pub(super) fn leader_guard(&self, identity: &str) -> Cmp {
        Cmp::ValueEquals {
            key: self.keys.leader().into_bytes(),
            value: identity.as_bytes().to_vec(),
        }
    }

    /// Deletes address index entries whose block is not leased by the
    /// entry's node (garbage of a crashed mirror or a released block),
    /// fenced per entry and by leadership. Returns how many were deleted.
    pub async fn gc_address_index(&self, leader: &str) -> Result<usize> {
        let mut from = Vec::new();
        let mut deleted = 0;
        loop {
            let (n, next) = self
                .gc_address_index_pages(leader, &from, usize::MAX)
                .await?;
            deleted += n;
            match next {
                Some(k) => from = k,
                None => return Ok(deleted),
            }
        }
    }

    /// [`Store::gc_address_index`] over at most `pages` pages of the index
    /// from key `from` (empty: its start): returns the entries deleted and
    /// where to go on (None once the end is reached). The controller sweeps
    /// the index a few pages per pass, so a pass costs the same at 150,000
    /// pods as at 1,500.
    pub async fn gc_address_index_pages(
        &self,
        leader: &str,
        from: &[u8],
        pages: usize,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        // The leases first, at revision R. The index is then read in pages
        // (one read of all of it outgrows gRPC's 4 MiB answers at about
        // 15,000 pods), and only entries written at or before R are judged
        // against the leases of R: an entry written later may belong to a
        // block leased after R. An entry stale at R stays stale unless it
        // is written again, and every delete is fenced on the entry's mod
        // revision (and on leadership).
        let mut r = self
            .backend
            .txn(
                "read blocks for index gc",
                Txn::read(vec![
                    Op::prefix(&self.keys.blocks()),
                    Op::prefix(&self.keys.pools()),
                ]),
            )
            .await?;
        let snapshot = r.revision;
        let pools = pools_by_name(&self.keys, &r.kvs(1));
        let listed = self.sift(&r.kvs(0), |kv| read_lease_in(&self.keys, kv, &pools));
        for b in &listed.bad {
            self.log_bad("gc address index", b);
        }
        // A bad block entry may be the lease of addresses in use: the index
        // entries of its pool are left alone while it is there, and all of
        // them if its key does not even name a pool.
        let mut shielded: BTreeSet<String> = BTreeSet::new();
        for b in &listed.bad {
            match self.keys.split_block_key(&b.key) {
                Some((pool, _)) => {
                    shielded.insert(pool.to_string());
                }
                None => {
                    tracing::warn!(key = %b.key, "bad block entry of no pool: the address index is not garbage-collected while it is there");
                    return Ok((0, None));
                }
            }
        }
        // Leases by block start: the block holding an address is the one
        // starting at or before it (blocks never overlap).
        let by_start: BTreeMap<IpAddr, BlockLease> = listed
            .items
            .into_iter()
            .map(|l| (l.block.network(), l))
            .collect();
        let owned = |rec: &AddressRecord| {
            by_start
                .range(..=rec.address)
                .next_back()
                .is_some_and(|(_, l)| l.block.contains(&rec.address) && l.node == rec.node)
        };
        let prefix = self.keys.addresses();
        let end = backend::prefix_end(prefix.as_bytes());
        let mut cursor = if from.starts_with(prefix.as_bytes()) {
            from.to_vec()
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut deleted = 0;
        let mut read = 0;
        loop {
            if read == pages {
                return Ok((deleted, Some(cursor)));
            }
            read += 1;
            let mut page = self
                .backend
                .txn(
                    "read index page",
                    Txn::read(vec![Op::Range {
                        start: cursor.clone(),
                        end: end.clone(),
                        limit: INDEX_PAGE,
                        keys_only: false,
                    }]),
                )
                .await?;
            let entries = page.kvs(0);
            let full = entries.len() as i64 >= INDEX_PAGE;
            if let Some(last) = entries.last() {
                cursor = last.key.clone();
                cursor.push(0);
            }
            for kv in entries {
                if kv.mod_revision > snapshot {
                    continue;
                }
                // A bad index entry is skipped, never deleted.
                let rec = match read_address(&self.keys, &kv) {
                    Ok(rec) => rec,
                    Err(b) => {
                        self.note_bad("gc address index", &b);
                        continue;
                    }
                };
                if shielded.contains(rec.pool.as_str()) || owned(&rec) {
                    continue;
                }
                let txn = Txn {
                    when: vec![
                        Cmp::ModRevision {
                            key: kv.key.clone(),
                            op: CmpOp::Equal,
                            rev: kv.mod_revision,
                        },
                        self.leader_guard(leader),
                    ],
                    then: vec![Op::Delete {
                        key: kv.key.clone(),
                    }],
                    otherwise: vec![],
                };
                if self.backend.txn("gc address index", txn).await?.succeeded {
                    deleted += 1;
                }
            }
            if !full {
                return Ok((deleted, None));
            }
        }
    }
}
