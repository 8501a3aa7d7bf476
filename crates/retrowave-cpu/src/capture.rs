//! Capture of one sequence's decode queries and KV cache for offline study of the wave index
//! (`RETROWAVE_CAPTURE_QK=DIR`, CPU backend, full attention): how much attention mass and output
//! error each way of choosing clusters leaves, on real data, without a model run per variant
//! (`bench/analysis/wave_rank_study.py` reads the files).
//!
//! Only steps of exactly one sequence and one row (a decode step of a single sequence attending
//! exactly) are captured, and only the sequence whose first such step came first: a later
//! sequence, or a step that does not follow the captured ones, is left out; so is every step
//! of a backend in a tensor-parallel group (it holds only its own heads). In `DIR`, per layer
//! `L`:
//! - `kv_L{L}.bin`: at the first decode step, the cached K then V (that step's token included)
//!   as little-endian f32, `[n_kv_heads][n][head_dim]` each;
//! - `q_L{L}.bin`: every decode step's query rows appended, f32 `[n_heads * head_dim]` each (after
//!   RoPE);
//! - `meta.txt`: `n n_kv_heads n_heads head_dim`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use retrowave_core::HeadLayout;

use crate::attention::CpuKv;

/// Where captures go, and which step each layer expects next.
#[derive(Debug)]
pub struct Capture {
    dir: PathBuf,
    /// Per layer: the position of the next decode step that belongs to the captured sequence
    /// (`None` before its first step).
    next: Mutex<Vec<Option<usize>>>,
    /// Whether a write failed (reported once; capturing stops).
    failed: AtomicBool,
}

impl Capture {
    /// Captures into `dir`, which is created.
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Capture {
            dir,
            next: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
        })
    }

    /// From `RETROWAVE_CAPTURE_QK`, if set (a directory that cannot be made is reported and
    /// ignored).
    pub fn from_env() -> Option<Self> {
        let dir = std::env::var_os("RETROWAVE_CAPTURE_QK")?;
        match Capture::new(&dir) {
            Ok(c) => {
                tracing::warn!(dir = %c.dir.display(), "capturing decode queries and KV (RETROWAVE_CAPTURE_QK)");
                Some(c)
            }
            Err(e) => {
                tracing::error!(dir = ?dir, error = %e, "RETROWAVE_CAPTURE_QK: cannot create the directory; not capturing");
                None
            }
        }
    }

    /// Records a decode step of `layer` at position `pos` (the row of `q`, `[n_heads *
    /// head_dim]`), with `cache` already holding that step's K and V.
    pub(crate) fn step(
        &self,
        layer: usize,
        pos: usize,
        q: &[f32],
        cache: &CpuKv,
        heads: HeadLayout,
    ) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let first = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            if next.len() <= layer {
                next.resize(layer + 1, None);
            }
            match next[layer] {
                Some(p) if p != pos => return,
                seen => {
                    next[layer] = Some(pos + 1);
                    seen.is_none()
                }
            }
        };
        if let Err(e) = self.write(layer, first, q, cache, heads) {
            tracing::error!(dir = %self.dir.display(), error = %e, "capture failed; capturing stops");
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    fn write(
        &self,
        layer: usize,
        first: bool,
        q: &[f32],
        cache: &CpuKv,
        heads: HeadLayout,
    ) -> std::io::Result<()> {
        if first {
            let n = cache.layer_len(layer);
            let heads_of = |values: bool| {
                (0..heads.n_kv_heads).flat_map(move |h| {
                    let (k, v) = cache.head_keys(layer, h);
                    if values { v } else { k }.iter().map(|x| x.to_f32())
                })
            };
            let kv = le_bytes(heads_of(false).chain(heads_of(true)));
            std::fs::write(self.dir.join(format!("kv_L{layer}.bin")), kv)?;
            std::fs::write(
                self.dir.join("meta.txt"),
                format!(
                    "{n} {} {} {}\n",
                    heads.n_kv_heads, heads.n_heads, heads.head_dim
                ),
            )?;
            // A capture starts afresh: a query file of an earlier run is replaced.
            std::fs::write(self.dir.join(format!("q_L{layer}.bin")), [])?;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join(format!("q_L{layer}.bin")))?;
        f.write_all(&le_bytes(q.iter().copied()))
    }
}

/// Little-endian f32 bytes.
fn le_bytes(xs: impl Iterator<Item = f32>) -> Vec<u8> {
    xs.flat_map(f32::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use retrowave_core::{Backend, BatchLayout, SeqRows};

    use super::*;
    use crate::{CpuActs, CpuBackend};

    const HEADS: HeadLayout = HeadLayout {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };

    fn acts(data: Vec<f32>, cols: usize) -> CpuActs {
        CpuActs {
            rows: data.len() / cols,
            data,
            cols,
        }
    }

    fn floats(path: &std::path::Path) -> Vec<f32> {
        std::fs::read(path)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn one_row(pos: usize, slot: usize) -> BatchLayout {
        BatchLayout {
            seqs: vec![SeqRows {
                slot,
                row: 0,
                start_pos: pos,
                n_tokens: 1,
            }],
        }
    }

    /// A prompt prefilled, then decode steps: the KV of the first step and every step's query
    /// land on disk as the module documents; a step of another sequence and multi-row steps do
    /// not.
    #[test]
    fn captures_the_first_decode_steps_kv_and_every_query() {
        let dir = tempfile::tempdir().unwrap();
        let b = CpuBackend::with_threads(1).with_capture(Capture::new(dir.path()).unwrap());
        let kw = HEADS.n_kv_heads * HEADS.head_dim;
        let qw = HEADS.n_heads * HEADS.head_dim;
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 64.0; // exact in f16
        let mut kv = CpuKv::new(2, HEADS, 64);
        let n = 5;
        let k: Vec<f32> = (0..n * kw).map(val).collect();
        let v: Vec<f32> = (0..n * kw).map(|i| val(i + 7)).collect();
        let prefill = BatchLayout {
            seqs: vec![SeqRows {
                slot: 0,
                row: 0,
                start_pos: 0,
                n_tokens: n,
            }],
        };
        let q0: Vec<f32> = (0..n * qw).map(|i| val(i + 3)).collect();
        for layer in 0..2 {
            b.attention(
                layer,
                &acts(q0.clone(), qw),
                &acts(k.clone(), kw),
                &acts(v.clone(), kw),
                &mut [&mut kv],
                &prefill,
                HEADS,
            )
            .unwrap();
        }
        assert!(
            !dir.path().join("kv_L0.bin").exists(),
            "prefill is not captured"
        );
        let mut queries = Vec::new();
        for step in 0..3 {
            let q: Vec<f32> = (0..qw).map(|i| val(i + 11 * step + 1)).collect();
            let kn: Vec<f32> = (0..kw).map(|i| val(i + 5 * step + 2)).collect();
            b.attention(
                1,
                &acts(q.clone(), qw),
                &acts(kn.clone(), kw),
                &acts(kn, kw),
                &mut [&mut kv],
                &one_row(n + step, 0),
                HEADS,
            )
            .unwrap();
            queries.extend(q);
        }
        // Another sequence's decode step (its position does not follow) is left out.
        let mut other = CpuKv::new(2, HEADS, 64);
        other.write(1, 0, &k[..kw], &v[..kw]).unwrap();
        let q: Vec<f32> = vec![1.0; qw];
        b.attention(
            1,
            &acts(q, qw),
            &acts(k[..kw].to_vec(), kw),
            &acts(v[..kw].to_vec(), kw),
            &mut [&mut other],
            &one_row(1, 1),
            HEADS,
        )
        .unwrap();

        assert_eq!(
            std::fs::read_to_string(dir.path().join("meta.txt")).unwrap(),
            format!("{} 2 4 8\n", n + 1)
        );
        assert_eq!(floats(&dir.path().join("q_L1.bin")), queries);
        let kvf = floats(&dir.path().join("kv_L1.bin"));
        assert_eq!(kvf.len(), 2 * HEADS.n_kv_heads * (n + 1) * HEADS.head_dim);
        // K of head 1, token 2, as written by the prefill.
        let hd = HEADS.head_dim;
        let at = ((n + 1) + 2) * hd; // head 1 starts after head 0's n + 1 rows
        assert_eq!(&kvf[at..at + hd], &k[2 * kw + hd..2 * kw + 2 * hd]);
        // V of head 0, token 4.
        let at = HEADS.n_kv_heads * (n + 1) * hd + 4 * hd;
        assert_eq!(&kvf[at..at + hd], &v[4 * kw..4 * kw + hd]);
        assert!(
            !dir.path().join("kv_L0.bin").exists(),
            "layer 0 had no decode step"
        );
    }

    /// A rank of a tensor-parallel group holds only its own heads: it captures nothing.
    #[test]
    fn a_rank_of_a_group_captures_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = CpuBackend::with_threads(1).with_capture(Capture::new(dir.path()).unwrap());
        assert!(CpuBackend::join_group(&[b.clone(), CpuBackend::with_threads(1)]).unwrap());
        let kw = HEADS.n_kv_heads * HEADS.head_dim;
        let qw = HEADS.n_heads * HEADS.head_dim;
        let mut kv = CpuKv::new(1, HEADS, 8);
        kv.write(0, 0, &vec![0.5; kw], &vec![0.5; kw]).unwrap();
        let row = vec![0.25; kw];
        b.attention(
            0,
            &acts(vec![1.0; qw], qw),
            &acts(row.clone(), kw),
            &acts(row, kw),
            &mut [&mut kv],
            &one_row(1, 0),
            HEADS,
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
