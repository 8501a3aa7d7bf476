//! Tensor-parallel sharding: which attention heads and which FFN columns each worker owns.
//!
//! A pure function of the model shape and the group size, so tests can inspect it. KV heads are
//! spread as evenly as possible and each worker takes the query heads of its KV heads (GQA groups
//! never straddle workers). The FFN is split in units of whole quantization super-blocks (256)
//! when the width allows, so the row-parallel down projection keeps its quantized storage.

use std::ops::Range;

use crate::EngineError;

/// The slice of the model one worker owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    pub kv_heads: Range<usize>,
    pub q_heads: Range<usize>,
    pub ffn: Range<usize>,
}

fn even_split(n: usize, parts: usize, part: usize) -> Range<usize> {
    let base = n / parts;
    let extra = n % parts;
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// Splits a model with `n_heads` query heads, `n_kv_heads` KV heads and FFN width `ffn` over
/// `world` workers.
pub fn plan(
    n_heads: usize,
    n_kv_heads: usize,
    ffn: usize,
    world: usize,
) -> Result<Vec<Shard>, EngineError> {
    if world == 0 {
        return Err(EngineError::Config(
            "tensor-parallel degree must be at least 1".into(),
        ));
    }
    if n_kv_heads < world {
        return Err(EngineError::Config(format!(
            "tensor-parallel degree {world} exceeds the model's {n_kv_heads} KV heads"
        )));
    }
    let group = n_heads / n_kv_heads;
    let unit = [256, 32, 1]
        .into_iter()
        .find(|u| ffn.is_multiple_of(*u) && ffn / u >= world)
        .unwrap_or(1);
    Ok((0..world)
        .map(|rank| {
            let kv = even_split(n_kv_heads, world, rank);
            let f = even_split(ffn / unit, world, rank);
            Shard {
                rank,
                world,
                q_heads: kv.start * group..kv.end * group,
                kv_heads: kv,
                ffn: f.start * unit..f.end * unit,
            }
        })
        .collect())
}

/// The vocabulary rows of each rank's share of a split LM head: `vocab` split as evenly as
/// possible over `world` ranks, in rank order.
pub fn vocab_split(vocab: usize, world: usize) -> Vec<Range<usize>> {
    (0..world.max(1))
        .map(|r| even_split(vocab, world.max(1), r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_split_covers_every_row_once() {
        for (vocab, world) in [(128256, 4), (151936, 2), (49152, 3), (10, 4), (7, 1)] {
            let v = vocab_split(vocab, world);
            assert_eq!(v.len(), world);
            assert_eq!(v[0].start, 0);
            assert_eq!(v[world - 1].end, vocab);
            for w in v.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
            }
        }
    }

    #[test]
    fn shards_cover_everything_once() {
        for (nh, nkv, ffn) in [(9, 3, 1536), (14, 2, 4864), (12, 2, 8960), (32, 8, 14336)] {
            for world in 1..=nkv.min(4) {
                let p = plan(nh, nkv, ffn, world).unwrap();
                assert_eq!(p.first().unwrap().kv_heads.start, 0);
                assert_eq!(p.last().unwrap().ffn.end, ffn);
                assert_eq!(p.last().unwrap().q_heads.end, nh);
                for w in p.windows(2) {
                    assert_eq!(w[0].kv_heads.end, w[1].kv_heads.start);
                    assert_eq!(w[0].ffn.end, w[1].ffn.start);
                    assert_eq!(w[0].q_heads.end, w[1].q_heads.start);
                }
                for s in &p {
                    assert!(!s.kv_heads.is_empty() && !s.ffn.is_empty());
                    assert_eq!(s.q_heads.len(), s.kv_heads.len() * nh / nkv);
                }
            }
        }
        // SmolLM2 over two workers: 2 + 1 KV heads, FFN in whole 256-blocks
        let p = plan(9, 3, 1536, 2).unwrap();
        assert_eq!((p[0].kv_heads.clone(), p[1].kv_heads.clone()), (0..2, 2..3));
        assert_eq!((p[0].ffn.clone(), p[1].ffn.clone()), (0..768, 768..1536));
        assert!(plan(9, 3, 1536, 4).is_err());
        assert!(plan(9, 3, 1536, 0).is_err());
    }
}
