//! Inspection: dump every record, and verify the journal (decodes, keys, and cross-record consistency).

use super::*;

pub(super) fn check_key(stored: &[u8], derived: &[u8]) -> Result<(), DecodeError> {
    if stored != derived {
        return Err(DecodeError::Payload(
            "record does not match the key it is stored under".into(),
        ));
    }
    Ok(())
}

pub(super) fn decode_address_kv(k: &[u8], v: &[u8]) -> Result<(IpAddr, AddressEntry), DecodeError> {
    let addr = codec::addr_from_key(k)?;
    let e = codec::decode_address(v)?;
    if !e.block.contains(&addr) {
        return Err(DecodeError::Payload(format!(
            "address {addr} outside its block {}",
            e.block
        )));
    }
    Ok((addr, e))
}

impl Journal {
    /// Decodes every record, collecting the ones that fail instead of
    /// stopping at the first.
    pub fn dump(&self) -> Dump {
        let mut d = Dump {
            stats: self.stats(),
            ..Default::default()
        };
        let mut bad = |t: Tree, k: &[u8], e: String| {
            d.corrupt.push(CorruptRecord {
                key: codec::show_key(t, k),
                reason: e,
            })
        };
        for t in Tree::ALL {
            let entries = match self.raw_range(t, Bound::Unbounded, Bound::Unbounded) {
                Ok(e) => e,
                Err(e) => {
                    bad(t, b"", e.to_string());
                    continue;
                }
            };
            for (k, v) in entries {
                let res: Result<(), DecodeError> = (|| {
                    match t {
                        Tree::Meta => match k.as_slice() {
                            META_NODE => d.node = Some(codec::decode_node_meta(&v)?),
                            META_INTENT_HWM => d.intent_hwm = codec::decode_counter(&v)?,
                            _ => return Err(DecodeError::Payload("unknown meta key".into())),
                        },
                        Tree::Leases => {
                            let l = codec::decode_lease(&v)?;
                            check_key(&k, &codec::net_key(l.block))?;
                            d.leases.push(l)
                        }
                        Tree::Attachments => {
                            let a = codec::decode_attachment(&v)?;
                            check_key(&k, &codec::attachment_key(&a.key))?;
                            d.attachments.push(a)
                        }
                        Tree::Intents => {
                            let i = codec::decode_intent(&v)?;
                            check_key(&k, &i.id.to_be_bytes())?;
                            d.intents.push(i)
                        }
                        Tree::Addresses => d.addresses.push(decode_address_kv(&k, &v)?),
                        Tree::Store => {
                            let v = codec::decode_store(&v)?;
                            d.store
                                .push((String::from_utf8_lossy(&k).into_owned(), v.len()))
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    bad(t, &k, e.to_string());
                }
            }
        }
        d
    }

    /// Checks every record and the cross-references between them.
    pub fn verify(&self) -> VerifyReport {
        let d = self.dump();
        let mut r = VerifyReport {
            records: (d.leases.len()
                + d.attachments.len()
                + d.intents.len()
                + d.addresses.len()
                + d.store.len()
                + usize::from(d.node.is_some())) as u64,
            stats: d.stats,
            torn_tails: self.report.torn_tails.clone(),
            ..Default::default()
        };
        r.records += d.corrupt.len() as u64;
        r.corrupt = d.corrupt;
        let atts: BTreeMap<&AttachmentKey, &Attachment> =
            d.attachments.iter().map(|a| (&a.key, a)).collect();
        let leases: BTreeMap<IpNet, &BlockLease> = d.leases.iter().map(|l| (l.block, l)).collect();
        for (addr, e) in &d.addresses {
            match atts.get(&e.attachment) {
                None => r.inconsistent.push(format!(
                    "address {addr} is owned by {}, which has no attachment record",
                    e.attachment
                )),
                Some(a) if !a.addresses.iter().any(|x| x.addr == *addr) => {
                    r.inconsistent.push(format!(
                        "address {addr} is owned by {}, whose record does not list it",
                        e.attachment
                    ))
                }
                Some(_) => {}
            }
            if !leases.contains_key(&e.block) {
                r.inconsistent.push(format!(
                    "address {addr} belongs to block {}, which the node does not lease",
                    e.block
                ));
            }
        }
        let owners: BTreeMap<IpAddr, &AddressEntry> =
            d.addresses.iter().map(|(a, e)| (*a, e)).collect();
        for a in &d.attachments {
            for x in &a.addresses {
                match owners.get(&x.addr) {
                    Some(e) if e.attachment == a.key => {}
                    Some(e) => r.inconsistent.push(format!(
                        "attachment {} lists {}, which the address index gives to {}",
                        a.key, x.addr, e.attachment
                    )),
                    None => r.inconsistent.push(format!(
                        "attachment {} lists {}, which is missing from the address index",
                        a.key, x.addr
                    )),
                }
            }
        }
        if let Some(max) = d.intents.iter().map(|i| i.id).max() {
            if max > d.intent_hwm {
                r.inconsistent.push(format!(
                    "intent {max} is above the intent high-water mark {}",
                    d.intent_hwm
                ));
            }
        }
        r
    }
}
