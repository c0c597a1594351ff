//! `coilctl store check`: every key judged against the layout.

use super::*;

impl<B: Backend> Store<B> {
    // ------------------------------------------------------------ check

    /// Every bad entry under the prefix, read at one revision: values that
    /// fail to decode or to validate against their key (and pool), keys
    /// outside coil's layout, and pools and subnet registry entries that
    /// disagree with each other. Changes nothing (`coilctl store check`).
    pub async fn check(&self) -> Result<Vec<BadEntry>> {
        let kvs = self.read_prefix("check store", self.keys.prefix()).await?;
        let by_key: HashMap<String, &KeyValue> = kvs.iter().map(|kv| (kv.key_str(), kv)).collect();
        let pool_kvs: Vec<KeyValue> = kvs
            .iter()
            .filter(|kv| kv.key.starts_with(self.keys.pools().as_bytes()))
            .cloned()
            .collect();
        let pools = pools_by_name(&self.keys, &pool_kvs);
        let registered = |s: &IpNet| {
            by_key
                .get(&self.keys.subnet(s))
                .and_then(|kv| read_subnet(&self.keys, kv).ok())
        };
        let mut bad = Vec::new();
        for kv in &kvs {
            let key = kv.key_str();
            let rest = key.strip_prefix(self.keys.prefix()).unwrap_or(&key);
            let verdict: std::result::Result<(), BadEntry> = if rest == "schema" {
                if kv.value == schema_value() {
                    Ok(())
                } else {
                    Err(bad_entry(
                        kv,
                        format!(
                            "schema value {:?} is not the {:?} this coil writes and fences on",
                            String::from_utf8_lossy(&kv.value),
                            String::from_utf8_lossy(&schema_value())
                        ),
                    ))
                }
            } else if rest.starts_with("pools/") {
                read_pool(&self.keys, kv).and_then(|p| {
                    for s in p.all_subnets() {
                        match registered(s) {
                            Some(r) if r.pool == p.name => {}
                            Some(r) => {
                                return Err(bad_entry(
                                    kv,
                                    format!("subnet {s} is registered to pool {}", r.pool),
                                ))
                            }
                            None => {
                                return Err(bad_entry(
                                    kv,
                                    format!(
                                        "subnet {s} has no valid entry {} in the subnet registry, \
                                         so overlap checks cannot see it",
                                        self.keys.subnet(s)
                                    ),
                                ))
                            }
                        }
                    }
                    Ok(())
                })
            } else if rest.starts_with("subnets/") {
                read_subnet(&self.keys, kv).and_then(|r| {
                    match pools.get(&r.pool) {
                        Some(p) if p.all_subnets().any(|s| *s == r.subnet) => Ok(()),
                        _ => Err(bad_entry(
                            kv,
                            format!(
                                "registered to pool {}, which does not exist, is bad or does not list {}",
                                r.pool, r.subnet
                            ),
                        )),
                    }
                })
            } else if rest.starts_with("blocks/") {
                read_lease_in(&self.keys, kv, &pools).map(|_| ())
            } else if rest.starts_with("nodes/") {
                read_node(&self.keys, kv).map(|_| ())
            } else if rest.starts_with("addresses/") {
                read_address(&self.keys, kv).map(|_| ())
            } else if key == self.keys.leader() {
                Ok(())
            } else {
                Err(bad_entry(kv, "not a key of coil's layout".into()))
            };
            if let Err(b) = verdict {
                bad.push(b);
            }
        }
        self.bad_seen.fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(bad)
    }
}
