//! The cluster stores of the CPU backend: the exact KV of indexed tokens in cluster order, per
//! (layer, KV head), either in host memory of the sequence's own ([`HostClusterStore`], one
//! contiguous run per cluster) or in the node's tiered store ([`TieredClusterStore`]: its host
//! arena, the coldest clusters spilled to the disk tier and read back when a step needs them).

use half::f16;
use retrowave_core::{ClusterKv, ClusterStore, HeadKey, StoreError};
use retrowave_store::{HeadRef, SeqId, TieredStore};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// `place` (where an append of `keys` and `values` for clusters of `sizes` goes: `None` for a
/// head outside the store) when the lengths match `sizes` at `head_dim`, else a shape error.
fn checked<T>(
    place: Option<T>,
    head_dim: usize,
    keys: &[f16],
    values: &[f16],
    sizes: &[u32],
) -> Result<T, StoreError> {
    let tokens: usize = sizes.iter().map(|&s| s as usize).sum();
    match place {
        Some(p) if keys.len() == tokens * head_dim && values.len() == tokens * head_dim => Ok(p),
        _ => Err(StoreError::Shape {
            tokens,
            head_dim,
            keys: keys.len(),
            values: values.len(),
        }),
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
        let hd = self.head_dim;
        let slot = checked(self.slot(head), hd, keys, values, sizes)?;
        let runs = &mut self.heads[slot];
        runs.keys.extend_from_slice(keys);
        runs.values.extend_from_slice(values);
        for &s in sizes {
            let last = runs.offsets.last().copied().unwrap_or(0);
            runs.offsets.push(last + s as usize);
        }
        Ok(())
    }

    fn with_clusters(
        &self,
        head: HeadKey,
        clusters: &[u32],
        f: &mut dyn FnMut(&[ClusterKv<'_>]),
    ) -> Result<(), StoreError> {
        let runs = clusters
            .iter()
            .map(|&c| self.read(head, c))
            .collect::<Result<Vec<_>, _>>()?;
        f(&runs);
        Ok(())
    }

    fn try_clone(&self) -> Result<Box<dyn ClusterStore>, StoreError> {
        Ok(Box::new(self.clone()))
    }

    fn n_bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|r| (r.keys.len() + r.values.len()) * 2 + r.offsets.len() * 8)
            .sum()
    }
}

impl HostClusterStore {
    /// The exact KV of one cluster.
    pub fn read(&self, head: HeadKey, cluster: u32) -> Result<ClusterKv<'_>, StoreError> {
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
}

/// Sequence ids of the tiered store, unique in the process (every worker's sequences share it).
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// The cluster-ordered KV of one sequence in a node's [`TieredStore`]. Reads pin the records a
/// step needs (loading those on disk first) and hand out one run a page, in place; the
/// sequence's records are freed when this is dropped.
#[derive(Debug)]
pub struct TieredClusterStore {
    store: TieredStore,
    seq: SeqId,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Per head (`layer * n_kv_heads + kv_head`), the store's id of each index cluster, or
    /// [`EMPTY`] for an empty one: the store keeps no record of zero tokens, while an index may
    /// have empty clusters (k-means can leave one without members).
    ids: Vec<Vec<u32>>,
    /// Record bytes appended (in host memory or on disk).
    bytes: usize,
}

/// [`TieredClusterStore::ids`] of an empty cluster.
const EMPTY: u32 = u32::MAX;

impl TieredClusterStore {
    /// An empty sequence in `store` for `n_layers x n_kv_heads` heads of `head_dim`.
    pub fn new(store: TieredStore, n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        TieredClusterStore {
            store,
            seq: SeqId(NEXT_SEQ.fetch_add(1, Ordering::Relaxed)),
            n_layers,
            n_kv_heads,
            head_dim,
            ids: vec![Vec::new(); n_layers * n_kv_heads],
            bytes: 0,
        }
    }

    /// The head's slot in `ids` and its key in the store.
    fn head_ref(&self, head: HeadKey) -> Option<(usize, HeadRef)> {
        let (l, h) = (head.layer as usize, head.kv_head as usize);
        (l < self.n_layers && h < self.n_kv_heads).then_some((
            l * self.n_kv_heads + h,
            HeadRef {
                seq: self.seq,
                layer: head.layer,
                kv_head: head.kv_head,
            },
        ))
    }
}

impl Drop for TieredClusterStore {
    fn drop(&mut self) {
        self.store.free_sequence(self.seq);
    }
}

fn tiered(e: retrowave_store::StoreError) -> StoreError {
    StoreError::Tiered(e.to_string())
}

impl ClusterStore for TieredClusterStore {
    fn append(
        &mut self,
        head: HeadKey,
        keys: &[f16],
        values: &[f16],
        sizes: &[u32],
    ) -> Result<(), StoreError> {
        let hd = self.head_dim;
        let (slot, href) = checked(self.head_ref(head), hd, keys, values, sizes)?;
        // Empty clusters add no rows, so the rows of the others are `keys` and `values` as given.
        let stored: Vec<u32> = sizes.iter().copied().filter(|&s| s > 0).collect();
        let mut next = if stored.is_empty() {
            0
        } else {
            self.store
                .append(
                    href,
                    hd as u32,
                    bytemuck::cast_slice(keys),
                    bytemuck::cast_slice(values),
                    &stored,
                )
                .map_err(tiered)?
                .start
        };
        self.ids[slot].extend(sizes.iter().map(|&s| {
            if s == 0 {
                EMPTY
            } else {
                next += 1;
                next - 1
            }
        }));
        let layout = self.store.layout(hd as u32);
        self.bytes += stored
            .iter()
            .map(|&s| layout.record_bytes(s))
            .sum::<usize>();
        Ok(())
    }

    fn with_clusters(
        &self,
        head: HeadKey,
        clusters: &[u32],
        f: &mut dyn FnMut(&[ClusterKv<'_>]),
    ) -> Result<(), StoreError> {
        let unknown = |cluster, stored| StoreError::UnknownCluster {
            layer: head.layer,
            kv_head: head.kv_head,
            cluster,
            stored,
        };
        let (slot, href) = self
            .head_ref(head)
            .ok_or_else(|| unknown(clusters.first().copied().unwrap_or(0), 0))?;
        let ids = &self.ids[slot];
        let mut wanted = Vec::with_capacity(clusters.len());
        for &c in clusters {
            match ids.get(c as usize) {
                Some(&EMPTY) => {}
                Some(&id) => wanted.push(id),
                None => return Err(unknown(c, ids.len())),
            }
        }
        if wanted.is_empty() {
            f(&[]);
            return Ok(());
        }
        let pinned = self.store.pin(href, &wanted).map_err(tiered)?;
        let layout = pinned.layout();
        let page_tokens = layout.page_tokens as usize;
        // A page in elements: the keys of its tokens, then their values.
        let (page, half) = (layout.page_bytes() / 2, page_tokens * self.head_dim);
        // Arena records are page-aligned; a record read past a full host memory lands in a
        // buffer of its own, which is copied here should it not be 2-byte aligned.
        let copies: Vec<Option<Vec<f16>>> = (0..pinned.len())
            .map(|i| {
                let (rec, _) = pinned.record(i);
                bytemuck::try_cast_slice::<u8, f16>(rec).is_err().then(|| {
                    rec.chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect()
                })
            })
            .collect();
        let mut runs = Vec::with_capacity(wanted.len() * 2);
        for (i, copy) in copies.iter().enumerate() {
            let (rec, tokens) = pinned.record(i);
            let rec: &[f16] = match copy {
                Some(c) => c,
                None => bytemuck::cast_slice(rec),
            };
            let mut left = tokens as usize;
            for p in rec.chunks_exact(page) {
                let n = left.min(page_tokens);
                if n == 0 {
                    break;
                }
                runs.push(ClusterKv {
                    keys: &p[..n * self.head_dim],
                    values: &p[half..half + n * self.head_dim],
                });
                left -= n;
            }
        }
        f(&runs);
        Ok(())
    }

    fn n_bytes(&self) -> usize {
        self.bytes
    }

    fn try_clone(&self) -> Result<Box<dyn ClusterStore>, StoreError> {
        let mut copy = TieredClusterStore::new(
            self.store.clone(),
            self.n_layers,
            self.n_kv_heads,
            self.head_dim,
        );
        for (slot, ids) in self
            .ids
            .iter()
            .enumerate()
            .filter(|(_, ids)| !ids.is_empty())
        {
            let head = HeadKey {
                layer: (slot / self.n_kv_heads) as u32,
                kv_head: (slot % self.n_kv_heads) as u32,
            };
            let href = HeadRef {
                seq: self.seq,
                layer: head.layer,
                kv_head: head.kv_head,
            };
            // One pin for the head's records (those on disk load in one batch), released
            // before the copy is appended: the copy may need the host memory they hold.
            let stored: Vec<u32> = ids.iter().copied().filter(|&id| id != EMPTY).collect();
            let (mut k, mut v, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
            {
                let pinned = self.store.pin(href, &stored).map_err(tiered)?;
                for i in 0..pinned.len() {
                    let (rec, n) = pinned.record(i);
                    pinned.layout().unpack(rec, n, &mut k, &mut v);
                    tokens.push(n);
                }
            }
            let mut tokens = tokens.into_iter();
            let sizes: Vec<u32> = ids
                .iter()
                .map(|&id| {
                    if id == EMPTY {
                        0
                    } else {
                        tokens.next().unwrap_or(0)
                    }
                })
                .collect();
            copy.append(
                head,
                bytemuck::cast_slice(&k),
                bytemuck::cast_slice(&v),
                &sizes,
            )?;
        }
        Ok(Box::new(copy))
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

    /// Runs of `clusters` of `head` as (keys, values) vectors.
    fn runs(s: &dyn ClusterStore, head: HeadKey, clusters: &[u32]) -> Vec<(Vec<f16>, Vec<f16>)> {
        let mut out = Vec::new();
        s.with_clusters(head, clusters, &mut |r| {
            out = r
                .iter()
                .map(|c| (c.keys.to_vec(), c.values.to_vec()))
                .collect();
        })
        .unwrap();
        out
    }

    /// The tiered store keeps no record of an empty cluster, while an index may have one: ids
    /// stay those of the index, an empty cluster reads as nothing, and pages come as runs.
    #[test]
    fn tiered_clusters_keep_index_ids_across_empty_clusters_and_forks() {
        let store = TieredStore::new(retrowave_store::StoreConfig {
            host_capacity_bytes: 1 << 20,
            ..Default::default()
        })
        .unwrap();
        let mut s = TieredClusterStore::new(store.clone(), 1, 2, 4);
        let h = HeadKey {
            layer: 0,
            kv_head: 1,
        };
        let k: Vec<f16> = (0..4 * 13).map(|i| f16::from_f32(i as f32)).collect();
        let v: Vec<f16> = (0..4 * 13).map(|i| f16::from_f32(-(i as f32))).collect();
        // Clusters 0..4 of 3, 0, 10 (two pages of 8) and 0 tokens.
        s.append(h, &k, &v, &[3, 0, 10, 0]).unwrap();
        assert_eq!(
            runs(&s, h, &[0]),
            vec![(k[..12].to_vec(), v[..12].to_vec())]
        );
        assert!(runs(&s, h, &[1, 3]).is_empty());
        let two = runs(&s, h, &[2, 1, 0]);
        assert_eq!(two.len(), 3);
        assert_eq!(two[0], (k[12..44].to_vec(), v[12..44].to_vec()));
        assert_eq!(two[1], (k[44..52].to_vec(), v[44..52].to_vec()));
        assert_eq!(two[2].0, k[..12].to_vec());
        assert!(matches!(
            s.with_clusters(h, &[4], &mut |_| {}),
            Err(StoreError::UnknownCluster { stored: 4, .. })
        ));
        // Appending more keeps counting the index's ids.
        s.append(h, &k[..8], &v[..8], &[0, 2]).unwrap();
        assert_eq!(runs(&s, h, &[5]), vec![(k[..8].to_vec(), v[..8].to_vec())]);
        let fork = s.try_clone().unwrap();
        drop(s);
        assert_eq!(runs(&*fork, h, &[5, 2]).len(), 3);
        assert_eq!(runs(&*fork, h, &[0])[0].1, v[..12].to_vec());
        drop(fork);
        assert_eq!(store.stats().clusters, 0);
    }
}
