//! Attention parts and their merge: exact attention over chosen tokens, the estimation formula
//! over cluster summaries, and the log-sum-exp merge that combines them.
//!
//! These are reference implementations (f64 accumulation) that faster kernels are checked against.

use thiserror::Error;

use crate::index::{ClusterIndex, IndexError};
use crate::kv::{KvView, ShapeError, dot};
use crate::zones::ZonePlan;

/// Errors of the attention functions.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AttentionError {
    /// A buffer has the wrong shape.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// The plan or index is inconsistent.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Two partials of different output lengths.
    #[error("cannot merge attention outputs of {left} and {right} floats")]
    MergeLen {
        /// Length of the first output.
        left: usize,
        /// Length of the second output.
        right: usize,
    },
}

/// Attention over part of the context: the normalised output and the log-sum-exp of its logits.
/// A part over no token has a zero output and `lse = -inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Softmax-weighted average of the values, `[value_dim]`.
    pub out: Vec<f32>,
    /// `ln sum_j exp(q . k_j * scale)` over the part's keys.
    pub lse: f32,
}

impl Partial {
    /// The part over no token.
    pub fn empty(value_dim: usize) -> Self {
        Self {
            out: vec![0.0; value_dim],
            lse: f32::NEG_INFINITY,
        }
    }

    /// Whether the part covers no softmax mass.
    pub fn is_empty(&self) -> bool {
        self.lse == f32::NEG_INFINITY
    }
}

/// Checks that `q` is one query row of `key_dim` floats.
fn check_query(q: &[f32], key_dim: usize) -> Result<(), ShapeError> {
    if q.len() != key_dim {
        return Err(ShapeError::Len {
            what: "query",
            got: q.len(),
            expected: key_dim,
        });
    }
    Ok(())
}

/// Softmax attention of `rows` = (logit, weight multiplier, value) triples: each row stands for
/// `multiplier` keys of that logit with that value.
fn softmax_rows<'v>(
    rows: impl Iterator<Item = (f64, f64, &'v [f32])> + Clone,
    value_dim: usize,
) -> Partial {
    let max = rows
        .clone()
        .filter(|r| r.1 > 0.0)
        .map(|r| r.0)
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return Partial::empty(value_dim);
    }
    let mut z = 0.0;
    let mut acc = vec![0f64; value_dim];
    for (logit, multiplier, value) in rows {
        if multiplier > 0.0 {
            let w = (logit - max).exp();
            z += multiplier * w;
            for (a, &v) in acc.iter_mut().zip(value) {
                *a += w * f64::from(v);
            }
        }
    }
    Partial {
        out: acc.iter().map(|&a| (a / z) as f32).collect(),
        lse: (max + z.ln()) as f32,
    }
}

/// Exact softmax attention of query `q` (`[key_dim]`) over the keys and values of `tokens`.
pub fn exact(
    kv: &KvView<'_>,
    tokens: &[u32],
    q: &[f32],
    scale: f32,
) -> Result<Partial, AttentionError> {
    check_query(q, kv.dims().key_dim)?;
    for &t in tokens {
        kv.check_range(t as usize, t as usize + 1)?;
    }
    let scale = f64::from(scale);
    let rows = tokens.iter().map(|&t| {
        let t = t as usize;
        (dot(q, kv.key_row(t)) * scale, 1.0, kv.value_row(t))
    });
    Ok(softmax_rows(rows, kv.dims().value_dim))
}

/// Dense attention of `q` over every token of `kv`.
pub fn dense(kv: &KvView<'_>, q: &[f32], scale: f32) -> Result<Partial, AttentionError> {
    let n = u32::try_from(kv.n_tokens()).map_err(|_| ShapeError::TooManyTokens {
        n_tokens: kv.n_tokens(),
        max: u32::MAX as usize,
    })?;
    let tokens: Vec<u32> = (0..n).collect();
    exact(kv, &tokens, q, scale)
}

/// The estimation zone of `plan` for one query head `q`: with `w_i = exp(q . c_i * scale - m)`,
/// output `sum w_i VS_i / sum |C_i| w_i` and log-sum-exp `m + ln sum |C_i| w_i`.
pub fn estimate(
    index: &ClusterIndex,
    plan: &ZonePlan,
    q: &[f32],
    scale: f32,
) -> Result<Partial, AttentionError> {
    estimate_clusters(index, &plan.estimation, q, scale)
}

/// The estimation formula over the given clusters (empty clusters contribute nothing).
pub fn estimate_clusters(
    index: &ClusterIndex,
    clusters: &[u32],
    q: &[f32],
    scale: f32,
) -> Result<Partial, AttentionError> {
    let dims = index.dims();
    check_query(q, dims.key_dim)?;
    for &c in clusters {
        index.check_cluster(c)?;
    }
    let scale = f64::from(scale);
    let rows = clusters.iter().map(|&c| {
        let c = c as usize;
        let centroid = index.centroid(c).unwrap_or_default();
        let value_sum = index.value_sum(c).unwrap_or_default();
        let size = f64::from(index.sizes()[c]);
        (dot(q, centroid) * scale, size, value_sum)
    });
    Ok(softmax_rows(rows, dims.value_dim))
}

/// Merges two attention parts over disjoint tokens by their log-sum-exps, as flash-decoding
/// merges splits.
pub fn merge(a: &Partial, b: &Partial) -> Result<Partial, AttentionError> {
    if a.out.len() != b.out.len() {
        return Err(AttentionError::MergeLen {
            left: a.out.len(),
            right: b.out.len(),
        });
    }
    if b.is_empty() {
        return Ok(a.clone());
    }
    if a.is_empty() {
        return Ok(b.clone());
    }
    let (la, lb) = (f64::from(a.lse), f64::from(b.lse));
    let m = la.max(lb);
    let (wa, wb) = ((la - m).exp(), (lb - m).exp());
    let z = wa + wb;
    Ok(Partial {
        out: a
            .out
            .iter()
            .zip(&b.out)
            .map(|(&x, &y)| ((wa * f64::from(x) + wb * f64::from(y)) / z) as f32)
            .collect(),
        lse: (m + z.ln()) as f32,
    })
}

/// Wave attention of one query head: exact attention over the steady zone and the retrieval
/// clusters, merged with the estimation zone.
pub fn attend(
    kv: &KvView<'_>,
    index: &ClusterIndex,
    plan: &ZonePlan,
    q: &[f32],
    scale: f32,
) -> Result<Partial, AttentionError> {
    let exact_part = exact(kv, &plan.exact_tokens(index)?, q, scale)?;
    let estimated = estimate(index, plan, q, scale)?;
    merge(&exact_part, &estimated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::HeadDims;

    #[test]
    fn exact_matches_hand_computation() {
        let keys = [1.0, 0.0, 0.0, 1.0];
        let values = [2.0, 4.0];
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 1,
        };
        let kv = KvView::new(&keys, &values, dims).unwrap();
        let p = exact(&kv, &[0, 1], &[1.0, 0.0], 2.0).unwrap();
        let e2 = 2f64.exp();
        let want = (2.0 * e2 + 4.0) / (e2 + 1.0);
        assert!((f64::from(p.out[0]) - want).abs() < 1e-6);
        assert!((f64::from(p.lse) - (e2 + 1.0).ln()).abs() < 1e-6);
        let none = exact(&kv, &[], &[1.0, 0.0], 2.0).unwrap();
        assert!(none.is_empty());
        assert_eq!(none.out, vec![0.0]);
        assert!(matches!(
            exact(&kv, &[2], &[1.0, 0.0], 1.0),
            Err(AttentionError::Shape(ShapeError::TokenOutOfRange { .. }))
        ));
        assert!(matches!(
            exact(&kv, &[0], &[1.0], 1.0),
            Err(AttentionError::Shape(ShapeError::Len { what: "query", .. }))
        ));
        assert!(matches!(
            merge(&Partial::empty(1), &Partial::empty(2)),
            Err(AttentionError::MergeLen { left: 1, right: 2 })
        ));
        assert!(
            merge(&Partial::empty(1), &Partial::empty(1))
                .unwrap()
                .is_empty()
        );
    }
}
