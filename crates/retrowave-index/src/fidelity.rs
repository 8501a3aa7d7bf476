//! How faithful the wave attention of one query head is to dense attention: the relative error
//! of its output and the share of the true softmax mass that each zone covers.

use crate::attention::{AttentionError, attend, dense};
use crate::index::{ClusterIndex, IndexError};
use crate::kv::{KvView, dot};
use crate::zones::{Zone, ZonePlan};

/// The fidelity of one decode step of one query head (see [`fidelity`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fidelity {
    /// `||wave - dense||_2 / ||dense||_2` over the attention outputs; `0` when both outputs are
    /// zero, `inf` when only the dense one is.
    pub rel_l2: f64,
    /// Share of the dense softmax mass on the tokens attended exactly (steady zone and retrieval
    /// clusters).
    pub mass_exact: f64,
    /// Share of the dense softmax mass on the tokens of all three zones (exact and estimation
    /// clusters); `1 - mass_all` is the mass of the skipped tokens.
    pub mass_all: f64,
    /// Tokens attended exactly.
    pub exact_tokens: usize,
    /// Tokens of the estimation clusters.
    pub estimated_tokens: usize,
}

/// Compares the wave attention ([`attend`]) of query `q` under `plan` with dense attention
/// ([`dense`]) over every token of `kv`, in f64. The masses are shares of the dense softmax
/// `exp(q . k_t * scale)` over all tokens; a token named by several zones counts once, in the
/// first of steady, retrieval, estimation ([`ZonePlan::token_zones`]). With no token at all (or
/// no finite logit) nothing is missed and both masses are `1`.
pub fn fidelity(
    kv: &KvView<'_>,
    index: &ClusterIndex,
    plan: &ZonePlan,
    q: &[f32],
    scale: f32,
) -> Result<Fidelity, AttentionError> {
    if index.dims() != kv.dims() {
        return Err(IndexError::DimsMismatch {
            index: index.dims(),
            given: kv.dims(),
        }
        .into());
    }
    let reference = dense(kv, q, scale)?;
    let wave = attend(kv, index, plan, q, scale)?;
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&w, &r) in wave.out.iter().zip(&reference.out) {
        diff += (f64::from(w) - f64::from(r)).powi(2);
        norm += f64::from(r).powi(2);
    }
    let rel_l2 = if norm > 0.0 {
        (diff / norm).sqrt()
    } else if diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };

    let zones = plan.token_zones(index, kv.n_tokens())?;
    let scale = f64::from(scale);
    let logits: Vec<f64> = (0..kv.n_tokens())
        .map(|t| dot(q, kv.key_row(t)) * scale)
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mut total, mut exact_mass, mut estimated_mass) = (0f64, 0f64, 0f64);
    let (mut exact_tokens, mut estimated_tokens) = (0, 0);
    for (&logit, zone) in logits.iter().zip(&zones) {
        let w = if max == f64::NEG_INFINITY {
            0.0
        } else {
            (logit - max).exp()
        };
        total += w;
        match zone {
            Zone::Steady | Zone::Retrieval => {
                exact_mass += w;
                exact_tokens += 1;
            }
            Zone::Estimation => {
                estimated_mass += w;
                estimated_tokens += 1;
            }
            Zone::Skipped => {}
        }
    }
    let (mass_exact, mass_all) = if total > 0.0 {
        (exact_mass / total, (exact_mass + estimated_mass) / total)
    } else {
        (1.0, 1.0)
    };
    Ok(Fidelity {
        rel_l2,
        mass_exact,
        mass_all,
        exact_tokens,
        estimated_tokens,
    })
}

#[cfg(test)]
// Plans hold vectors of token ranges, often of one range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::config::WaveConfig;
    use crate::kv::HeadDims;

    /// Keys (1,0), (1,0), (0,1), (0,1), (-1,0), (0,0) with values 1..6; clustered with no sinks
    /// and a window of one token: tokens 0..5 indexed, token 5 steady.
    fn small() -> (Vec<f32>, Vec<f32>, ClusterIndex) {
        let keys = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0];
        let values = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 1,
        };
        let cfg = WaveConfig {
            sink_tokens: 0,
            window_tokens: 1,
            avg_cluster_size: 2,
            segment_tokens: 5,
            ..WaveConfig::published()
        };
        let kv = KvView::new(&keys, &values, dims).unwrap();
        let index = ClusterIndex::build(&kv, &cfg).unwrap();
        (keys, values, index)
    }

    fn kv<'a>(keys: &'a [f32], values: &'a [f32]) -> KvView<'a> {
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 1,
        };
        KvView::new(keys, values, dims).unwrap()
    }

    #[test]
    fn everything_retrieved_is_dense() {
        let (keys, values, index) = small();
        let kv = kv(&keys, &values);
        let plan = ZonePlan {
            steady: vec![5..6],
            retrieval: (0..index.n_clusters() as u32).collect(),
            estimation: Vec::new(),
        };
        let f = fidelity(&kv, &index, &plan, &[0.7, -1.3], 0.9).unwrap();
        assert!(f.rel_l2 < 1e-6, "{f:?}");
        assert!((f.mass_exact - 1.0).abs() < 1e-12, "{f:?}");
        assert!((f.mass_all - 1.0).abs() < 1e-12, "{f:?}");
        assert_eq!((f.exact_tokens, f.estimated_tokens), (6, 0));
    }

    /// With nothing retrieved and everything estimated, the exact mass is the steady share and
    /// the three zones hold all the mass.
    #[test]
    fn all_estimated_leaves_the_steady_share_exact() {
        let (keys, values, index) = small();
        let kv = kv(&keys, &values);
        let plan = ZonePlan {
            steady: vec![5..6],
            retrieval: Vec::new(),
            estimation: (0..index.n_clusters() as u32).collect(),
        };
        let q = [0.7f32, -1.3];
        let f = fidelity(&kv, &index, &plan, &q, 0.9).unwrap();
        let logits: Vec<f64> = keys
            .chunks_exact(2)
            .map(|k| (f64::from(q[0]) * f64::from(k[0]) + f64::from(q[1]) * f64::from(k[1])) * 0.9)
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        assert!((f.mass_exact - logits[5].exp() / z).abs() < 1e-9, "{f:?}");
        assert!((f.mass_all - 1.0).abs() < 1e-12, "{f:?}");
        assert_eq!((f.exact_tokens, f.estimated_tokens), (1, 5));
        // The estimate is approximate: not exact, but not far off either.
        assert!(f.rel_l2 > 1e-4 && f.rel_l2 < 1.0, "{f:?}");
    }

    /// Hand-computed case: three tokens with keys 1, 0, -1 (key_dim 1), values 0, 1, 2 (so
    /// value_dim 1), query 1, scale ln 2: weights 2, 1, 1/2. Token 0 steady, token 1 in one
    /// (retrieved) cluster, token 2 in another one (skipped).
    #[test]
    fn hand_computed() {
        let keys = [1.0f32, 0.0, -1.0];
        let values = [0.0f32, 1.0, 2.0];
        let dims = HeadDims {
            key_dim: 1,
            value_dim: 1,
        };
        let kv = KvView::new(&keys, &values, dims).unwrap();
        let cfg = WaveConfig {
            sink_tokens: 1,
            window_tokens: 0,
            avg_cluster_size: 1,
            segment_tokens: 2,
            ..WaveConfig::published()
        };
        let index = ClusterIndex::build(&kv, &cfg).unwrap();
        assert_eq!(index.members(0), Some(&[1u32][..]));
        assert_eq!(index.members(1), Some(&[2u32][..]));
        let plan = ZonePlan {
            steady: vec![0..1],
            retrieval: vec![0],
            estimation: Vec::new(),
        };
        let scale = std::f32::consts::LN_2;
        let f = fidelity(&kv, &index, &plan, &[1.0], scale).unwrap();
        // Dense: (2*0 + 1*1 + 0.5*2) / 3.5 = 4/7. Wave: (2*0 + 1*1) / 3 = 1/3.
        let (dense_out, wave_out) = (4.0 / 7.0, 1.0 / 3.0);
        assert!(
            (f.rel_l2 - (dense_out - wave_out) / dense_out).abs() < 1e-6,
            "{f:?}"
        );
        assert!((f.mass_exact - 3.0 / 3.5).abs() < 1e-6, "{f:?}");
        assert!((f.mass_all - 3.0 / 3.5).abs() < 1e-6, "{f:?}");
        assert_eq!((f.exact_tokens, f.estimated_tokens), (2, 0));

        // Estimating the other cluster (of one token, so exact) completes the mass and output.
        let plan = ZonePlan {
            estimation: vec![1],
            ..plan
        };
        let f = fidelity(&kv, &index, &plan, &[1.0], scale).unwrap();
        assert!(f.rel_l2 < 1e-6, "{f:?}");
        assert!((f.mass_exact - 3.0 / 3.5).abs() < 1e-6, "{f:?}");
        assert!((f.mass_all - 1.0).abs() < 1e-12, "{f:?}");
        assert_eq!((f.exact_tokens, f.estimated_tokens), (2, 1));

        // Bad inputs: a query of the wrong length, a plan beyond the sequence.
        assert!(fidelity(&kv, &index, &plan, &[1.0, 2.0], scale).is_err());
        let beyond = ZonePlan {
            steady: vec![0..4],
            ..ZonePlan::default()
        };
        assert!(fidelity(&kv, &index, &beyond, &[1.0], scale).is_err());
    }
}
