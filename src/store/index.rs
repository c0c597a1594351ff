//! The address index: one entry per pod address, written by coild and swept by the controller.

use super::*;

impl<B: Backend> Store<B> {
    // -------------------------------------------------- address index

    /// Records an address assignment in the index (coild mirrors its
    /// journal here asynchronously). A record that reads would refuse is
    /// refused here. It replaces a valid entry (a newer assignment wins),
    /// but never a bad one: that is [`StoreError::Corrupt`], and the entry
    /// stays for an administrator to look at.
    pub async fn put_address(&self, rec: &AddressRecord) -> Result<()> {
        let key = self.keys.address(rec.address);
        model::validate_address_entry(&self.keys, &key, rec)
            .map_err(|r| StoreError::Invalid(format!("address record {}: {r}", rec.address)))?;
        let value = encode(rec);
        // First try: the key is absent (one request in the common case).
        let mut fence = Cmp::CreateRevision {
            key: key.clone().into_bytes(),
            op: CmpOp::Equal,
            rev: 0,
        };
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt.saturating_sub(1)).await;
            let txn = Txn {
                when: vec![self.schema_guard(), fence],
                then: vec![Op::put(key.clone(), value.clone())],
                otherwise: vec![Op::get(key.clone()), Op::get(self.keys.schema())],
            };
            let mut r = self.backend.txn("index address", txn).await?;
            if r.succeeded {
                return Ok(());
            }
            let (cur, schema) = (r.kvs(0), r.kvs(1));
            if schema.first().map(|kv| kv.value.as_slice()) != Some(schema_value().as_slice()) {
                self.schema().await?;
                return Err(StoreError::corrupt(
                    &self.keys.schema(),
                    "schema key missing",
                ));
            }
            fence = match cur.first() {
                None => Cmp::CreateRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                Some(kv) => {
                    read_address(&self.keys, kv).map_err(|b| self.refuse(b))?;
                    if kv.value == value {
                        return Ok(());
                    }
                    Cmp::ModRevision {
                        key: key.clone().into_bytes(),
                        op: CmpOp::Equal,
                        rev: kv.mod_revision,
                    }
                }
            };
        }
        Err(self.conflict("index address", &key))
    }

    /// Removes an index entry, only if it still belongs to `rec`'s
    /// attachment (container id and ifname): a late delete of an old
    /// assignment never removes a newer one. Returns whether it deleted.
    pub async fn delete_address(&self, rec: &AddressRecord) -> Result<bool> {
        let key = self.keys.address(rec.address);
        self.optimistic("unindex address", &key, || async {
            let Some(kv) = self.read_one("unindex address", key.clone()).await? else {
                return Ok(Try::Done(false));
            };
            // A bad entry is refused, never deleted.
            let cur = read_address(&self.keys, &kv).map_err(|b| self.refuse(b))?;
            if cur.container_id != rec.container_id || cur.ifname != rec.ifname {
                return Ok(Try::Done(false));
            }
            let txn = Txn {
                when: vec![Cmp::ModRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: kv.mod_revision,
                }],
                then: vec![Op::Delete {
                    key: key.clone().into_bytes(),
                }],
                otherwise: vec![],
            };
            if self.backend.txn("unindex address", txn).await?.succeeded {
                return Ok(Try::Done(true));
            }
            Ok(Try::Lost)
        })
        .await
    }

    /// Valid index entries inside `net`, in address order (bad entries are
    /// skipped, counted and logged).
    pub async fn addresses_in(&self, net: &IpNet) -> Result<Vec<AddressRecord>> {
        Ok(self.logged("list addresses", self.addresses_in_checked(net).await?))
    }

    /// Valid index entries inside `net`, in address order, and the bad
    /// entries in that range.
    pub async fn addresses_in_checked(&self, net: &IpNet) -> Result<Listing<AddressRecord>> {
        let (a, b) = self.keys.address_range(net);
        let mut r = self
            .backend
            .txn("list addresses", Txn::read(vec![Op::range(a, b)]))
            .await?;
        Ok(self.sift(&r.kvs(0), |kv| read_address(&self.keys, kv)))
    }

    /// Everything the store knows about one address;
    /// [`StoreError::Corrupt`] if its index entry or its block's entry is
    /// bad.
    pub async fn address_info(&self, address: IpAddr) -> Result<AddressInfo> {
        let pools = self.list_pools().await?;
        let found = pools
            .iter()
            .find_map(|p| p.block_of(address).map(|b| (p, b)));
        let mut ops = vec![Op::get(self.keys.address(address))];
        if let Some((pool, block)) = &found {
            ops.push(Op::get(self.keys.block(&pool.name, block)));
        }
        let mut r = self.backend.txn("address info", Txn::read(ops)).await?;
        let (record, lease) = (r.kvs(0), r.kvs(1));
        let record = match record.first() {
            None => None,
            Some(kv) => Some(read_address(&self.keys, kv).map_err(|b| self.refuse(b))?),
        };
        let lease = match lease.first() {
            None => None,
            Some(kv) => Some(
                read_lease(&self.keys, kv, found.as_ref().map(|f| f.0))
                    .map_err(|b| self.refuse(b))?,
            ),
        };
        Ok(AddressInfo {
            address,
            pool: found.as_ref().map(|f| f.0.name.clone()),
            block: found.map(|f| f.1),
            lease,
            record,
        })
    }
}
