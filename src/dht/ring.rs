//! Placement: which store nodes hold a template, by rendezvous (highest random
//! weight) hashing of its fingerprint over the configured membership list.
//!
//! Rendezvous hashing rather than a ring of virtual nodes because the membership
//! lists are short (a handful to a few dozen store nodes): scoring every node per
//! lookup is cheap, needs no table, balances as well as the fingerprints are
//! random (they are BLAKE3 output), and removing or adding a node moves only the
//! templates whose top-R set it enters or leaves. A node's identity is the string
//! it is configured under (its URL), so every proxy and the seeding tool must list
//! the same strings; their order does not matter.

use crate::page::Fingerprint;

/// BLAKE3 key-derivation context of a node's seed: names the placement version, so
/// a future scheme cannot silently place templates where this one does not look.
const SEED_CONTEXT: &str = "migstream dht rendezvous v1 node seed";

/// The default replication factor: every template is on two nodes, so any one node
/// can be lost.
pub const DEFAULT_REPLICAS: usize = 2;

/// Which nodes hold which template: `replicas` nodes out of the membership list,
/// in a preference order that is the same on every host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    seeds: Vec<u64>,
    replicas: usize,
}

impl Ring {
    /// The placement over nodes named `names` (in configuration order) with
    /// `replicas` copies of every template, at most one per node.
    ///
    /// Fails with [`crate::Error::InvalidRecord`] if there is no node, a name is
    /// listed twice, or `replicas` is zero or more than the nodes.
    pub fn new<S: AsRef<str>>(names: &[S], replicas: usize) -> crate::Result<Self> {
        let invalid = |reason| crate::Error::InvalidRecord {
            field: "dht membership",
            reason,
        };
        if names.is_empty() {
            return Err(invalid("no store node"));
        }
        if replicas == 0 || replicas > names.len() {
            return Err(invalid("replicas must be from 1 to the number of nodes"));
        }
        let mut sorted: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("a store node is listed twice"));
        }
        let seeds = names.iter().map(|n| seed(n.as_ref())).collect();
        Ok(Self { seeds, replicas })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    /// Always false: a ring has at least one node.
    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// Copies of every template.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The nodes holding `fp` (indexes into the membership list), best first: the
    /// `replicas` nodes with the highest scores for it.
    pub fn owners(&self, fp: &Fingerprint) -> Vec<usize> {
        let mut scored: Vec<(u64, usize)> = self
            .seeds
            .iter()
            .enumerate()
            .map(|(i, &seed)| (score(seed, fp), i))
            .collect();
        // highest score first; equal scores (2^-64 apart) by position, so still total
        scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(self.replicas);
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

/// A node's 64-bit seed, from its configured name.
fn seed(name: &str) -> u64 {
    let hash = blake3::derive_key(SEED_CONTEXT, name.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The weight of node `seed` for `fp`: a keyed mix of all 128 bits of the
/// fingerprint. Fingerprints are uniform already; the mix makes one node's weights
/// independent of another's.
fn score(seed: u64, fp: &Fingerprint) -> u64 {
    let lo = u64::from_le_bytes(fp.0[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(fp.0[8..].try_into().expect("8 bytes"));
    mix(mix(lo ^ seed) ^ hi.wrapping_add(seed.rotate_left(29)))
}

/// A 64-bit finalizer (xor-shift-multiply, as in SplitMix64): every input bit
/// affects every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fps(n: u32) -> impl Iterator<Item = Fingerprint> {
        (0..n).map(|i| Fingerprint::of(&i.to_le_bytes()))
    }

    #[test]
    fn owners_are_distinct_deterministic_and_order_free() {
        let names = ["redis://a:1", "redis://b:1", "redis://c:1", "redis://d:1"];
        let ring = Ring::new(&names, 2).unwrap();
        let reversed: Vec<_> = names.iter().rev().collect();
        let other = Ring::new(&reversed, 2).unwrap();
        for fp in fps(1000) {
            let owners = ring.owners(&fp);
            assert_eq!(owners.len(), 2);
            assert_ne!(owners[0], owners[1]);
            assert_eq!(owners, ring.owners(&fp));
            // the same nodes whatever the configuration order
            let same: Vec<_> = other.owners(&fp).iter().map(|&i| 3 - i).collect();
            assert_eq!(owners, same);
        }
    }

    #[test]
    fn balanced_with_four_nodes_and_two_replicas() {
        let ring = Ring::new(&["n0", "n1", "n2", "n3"], 2).unwrap();
        let mut per_node = [0u32; 4];
        let n = 20_000;
        for fp in fps(n) {
            ring.owners(&fp).iter().for_each(|&i| per_node[i] += 1);
        }
        let mean = f64::from(n * 2) / 4.0;
        let max = f64::from(*per_node.iter().max().unwrap());
        assert!(max / mean <= 1.05, "{per_node:?}");
    }

    #[test]
    fn a_removed_node_moves_only_its_templates() {
        let four = Ring::new(&["n0", "n1", "n2", "n3"], 1).unwrap();
        let three = Ring::new(&["n0", "n1", "n2"], 1).unwrap();
        for fp in fps(2000) {
            let before = four.owners(&fp)[0];
            if before != 3 {
                assert_eq!(three.owners(&fp)[0], before);
            }
        }
    }

    #[test]
    fn bad_memberships_are_refused() {
        assert!(Ring::new::<&str>(&[], 1).is_err());
        assert!(Ring::new(&["a", "b"], 0).is_err());
        assert!(Ring::new(&["a", "b"], 3).is_err());
        assert!(Ring::new(&["a", "a"], 1).is_err());
    }
}
