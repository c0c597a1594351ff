//! Typed reads: the memtable first, then sled.

use super::*;

impl Journal {
    /// Reads one raw value: memtable first, then sled.
    pub(super) fn raw_get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.settle()?;
        let tables = self.inner.tables.read().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = tables.active.0[t.index()].get(key) {
            return Ok(v.clone());
        }
        if let Some(f) = &tables.frozen {
            if let Some(v) = f.0[t.index()].get(key) {
                return Ok(v.clone());
            }
        }
        Ok(self.inner.trees[t.index()]
            .get(key)
            .map_err(|e| JournalError::sled("read", e))?
            .map(|v| v.to_vec()))
    }

    /// Reads a key range of a tree, memtable merged over sled, in key order.
    pub(super) fn raw_range(
        &self,
        t: Tree,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.settle()?;
        let tables = self.inner.tables.read().unwrap_or_else(|e| e.into_inner());
        let mut m: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.inner.trees[t.index()].range((lo.clone(), hi.clone())) {
            let (k, v) = kv.map_err(|e| JournalError::sled("scan", e))?;
            m.insert(k.to_vec(), Some(v.to_vec()));
        }
        let layers = tables.frozen.iter().map(|f| &f.0[t.index()]);
        for layer in layers.chain(std::iter::once(&tables.active.0[t.index()])) {
            for (k, v) in layer.range((lo.clone(), hi.clone())) {
                m.insert(k.clone(), v.clone());
            }
        }
        Ok(m.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }

    pub(super) fn get<T>(
        &self,
        t: Tree,
        key: &[u8],
        dec: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>> {
        match self.raw_get(t, key)? {
            Some(v) => dec(&v).map(Some).map_err(|e| corrupt(t, key, e)),
            None => Ok(None),
        }
    }

    pub(super) fn scan<T>(
        &self,
        t: Tree,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        dec: fn(&[u8], &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>> {
        self.raw_range(t, lo, hi)?
            .into_iter()
            .map(|(k, v)| dec(&k, &v).map_err(|e| corrupt(t, &k, e)))
            .collect()
    }

    pub(super) fn scan_all<T>(
        &self,
        t: Tree,
        dec: fn(&[u8], &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>> {
        self.scan(t, Bound::Unbounded, Bound::Unbounded, dec)
    }

    pub fn node_meta(&self) -> Result<Option<NodeMeta>> {
        self.get(Tree::Meta, META_NODE, codec::decode_node_meta)
    }

    pub fn lease(&self, block: IpNet) -> Result<Option<BlockLease>> {
        self.get(Tree::Leases, &codec::net_key(block), codec::decode_lease)
    }

    /// All leases, ordered by block address.
    pub fn leases(&self) -> Result<Vec<BlockLease>> {
        self.scan_all(Tree::Leases, |k, v| {
            let l = codec::decode_lease(v)?;
            check_key(k, &codec::net_key(l.block))?;
            Ok(l)
        })
    }

    pub fn attachment(&self, key: &AttachmentKey) -> Result<Option<Attachment>> {
        self.get(
            Tree::Attachments,
            &codec::attachment_key(key),
            codec::decode_attachment,
        )
    }

    /// All attachments, ordered by (container id, ifname).
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        self.scan_all(Tree::Attachments, |k, v| {
            let a = codec::decode_attachment(v)?;
            check_key(k, &codec::attachment_key(&a.key))?;
            Ok(a)
        })
    }

    pub fn intent(&self, id: u64) -> Result<Option<Intent>> {
        self.get(Tree::Intents, &id.to_be_bytes(), codec::decode_intent)
    }

    /// All intents, oldest first.
    pub fn intents(&self) -> Result<Vec<Intent>> {
        self.scan_all(Tree::Intents, |k, v| {
            let i = codec::decode_intent(v)?;
            check_key(k, &i.id.to_be_bytes())?;
            Ok(i)
        })
    }

    /// Intents still pending, oldest first: what recovery must settle.
    pub fn pending_intents(&self) -> Result<Vec<Intent>> {
        Ok(self
            .intents()?
            .into_iter()
            .filter(|i| i.state == IntentState::Pending)
            .collect())
    }

    pub fn address(&self, addr: IpAddr) -> Result<Option<AddressEntry>> {
        self.get(
            Tree::Addresses,
            &codec::addr_key(addr),
            codec::decode_address,
        )
    }

    /// Addresses assigned inside `block`, in address order: an O(log n + k)
    /// range scan, which is what the allocator needs to find free room.
    pub fn addresses_in(&self, block: IpNet) -> Result<Vec<(IpAddr, AddressEntry)>> {
        let lo = codec::addr_key(block.network());
        let hi = codec::addr_key(block.broadcast());
        self.scan(
            Tree::Addresses,
            Bound::Included(lo),
            Bound::Included(hi),
            decode_address_kv,
        )
    }

    /// Every assigned address, in address order.
    pub fn addresses(&self) -> Result<Vec<(IpAddr, AddressEntry)>> {
        self.scan_all(Tree::Addresses, decode_address_kv)
    }

    /// One entry of the embedded cluster store.
    pub fn store_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(Tree::Store, key, codec::decode_store)
    }

    /// Entries of the embedded cluster store with keys in `[lo, hi)` (an
    /// empty `hi` means no upper bound), in key order.
    pub fn store_range(&self, lo: &[u8], hi: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let upper = if hi.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(hi.to_vec())
        };
        self.scan(Tree::Store, Bound::Included(lo.to_vec()), upper, |k, v| {
            Ok((k.to_vec(), codec::decode_store(v)?))
        })
    }
}
