//! The host-memory cluster store of the CPU backend: the exact KV of indexed tokens in cluster
//! order, one contiguous run per cluster, per (layer, KV head).

use half::f16;
use retrowave_core::{ClusterKv, ClusterStore, HeadKey, StoreError};

/// One head's clusters.
#[derive(Debug, Clone, Default)]
struct HeadRuns {
    keys: Vec<f16>,
    values: Vec<f16>,
    /// Token offset of each cluster, plus the end.
    offsets: Vec<usize>,
}

/// Cluster-ordered KV of one sequence in host memory.
#[derive(Debug, Clone)]
pub struct HostClusterStore {
    n_kv_heads: usize,
    head_dim: usize,
    heads: Vec<HeadRuns>,
}

impl HostClusterStore {
    /// An empty store for `n_layers x n_kv_heads` heads of `head_dim`.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        HostClusterStore {
            n_kv_heads,
            head_dim,
            heads: vec![
                HeadRuns {
                    offsets: vec![0],
                    ..HeadRuns::default()
                };
                n_layers * n_kv_heads
            ],
        }
    }

    fn slot(&self, head: HeadKey) -> Option<usize> {
        let (l, h) = (head.layer as usize, head.kv_head as usize);
        (h < self.n_kv_heads)
            .then(|| l * self.n_kv_heads + h)
            .filter(|&i| i < self.heads.len())
    }
}

impl ClusterStore for HostClusterStore {
    fn append(
        &mut self,
        head: HeadKey,
        keys: &[f16],
        values: &[f16],
        sizes: &[u32],
    ) -> Result<(), StoreError> {
        let tokens: usize = sizes.iter().map(|&s| s as usize).sum();
        let hd = self.head_dim;
        let slot = self.slot(head);
        if keys.len() != tokens * hd || values.len() != tokens * hd || slot.is_none() {
            return Err(StoreError::Shape {
                tokens,
                head_dim: hd,
                keys: keys.len(),
                values: values.len(),
            });
        }
        let runs = &mut self.heads[slot.unwrap_or_default()];
        runs.keys.extend_from_slice(keys);
        runs.values.extend_from_slice(values);
        for &s in sizes {
            let last = runs.offsets.last().copied().unwrap_or(0);
            runs.offsets.push(last + s as usize);
        }
        Ok(())
    }

    fn read(&self, head: HeadKey, cluster: u32) -> Result<ClusterKv<'_>, StoreError> {
        let unknown = |stored| StoreError::UnknownCluster {
            layer: head.layer,
            kv_head: head.kv_head,
            cluster,
            stored,
        };
        let runs = self
            .slot(head)
            .map(|i| &self.heads[i])
            .ok_or_else(|| unknown(0))?;
        let c = cluster as usize;
        if c + 1 >= runs.offsets.len() {
            return Err(unknown(runs.offsets.len() - 1));
        }
        let hd = self.head_dim;
        let (a, b) = (runs.offsets[c] * hd, runs.offsets[c + 1] * hd);
        Ok(ClusterKv {
            keys: &runs.keys[a..b],
            values: &runs.values[a..b],
        })
    }

    fn n_bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|r| (r.keys.len() + r.values.len()) * 2 + r.offsets.len() * 8)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_round_trip_and_bad_ids_are_errors() {
        let mut s = HostClusterStore::new(2, 2, 2);
        let h = HeadKey {
            layer: 1,
            kv_head: 1,
        };
        let k: Vec<f16> = (0..10).map(|i| f16::from_f32(i as f32)).collect();
        let v: Vec<f16> = (0..10).map(|i| f16::from_f32(-(i as f32))).collect();
        s.append(h, &k[..6], &v[..6], &[1, 2]).unwrap();
        s.append(h, &k[6..], &v[6..], &[2]).unwrap();
        let c1 = s.read(h, 1).unwrap();
        assert_eq!(c1.keys, &k[2..6]);
        assert_eq!(c1.values, &v[2..6]);
        assert_eq!(s.read(h, 2).unwrap().keys, &k[6..10]);
        assert!(matches!(
            s.read(h, 3),
            Err(StoreError::UnknownCluster { stored: 3, .. })
        ));
        let other = HeadKey {
            layer: 0,
            kv_head: 0,
        };
        assert!(s.read(other, 0).is_err());
        let outside = HeadKey {
            layer: 2,
            kv_head: 0,
        };
        assert!(s.append(outside, &k[..2], &v[..2], &[1]).is_err());
        assert!(s.append(h, &k[..3], &v[..2], &[1]).is_err());
    }
}
