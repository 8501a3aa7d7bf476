//! Element-wise and row-wise operations: RMS normalisation, rotary embeddings, SwiGLU.

use rayon::prelude::*;
use retrowave_core::{RopeParams, RopeStyle};

/// Row-wise RMS normalisation: `y = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let norm_row = |(yr, xr): (&mut [f32], &[f32])| {
        let ss: f64 = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let scale = (1.0 / (ss / cols as f64 + eps as f64).sqrt()) as f32;
        for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    };
    if x.len() / cols >= 64 {
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(norm_row);
    } else {
        y.chunks_mut(cols).zip(x.chunks(cols)).for_each(norm_row);
    }
    y
}

/// Inverse frequencies of the rotated pairs: `theta^(-2i/dim)`.
fn inv_freqs(rope: &RopeParams) -> Vec<f64> {
    (0..rope.dim / 2)
        .map(|i| (rope.theta as f64).powf(-2.0 * i as f64 / rope.dim as f64))
        .collect()
}

/// Applies rotary embeddings in place to `x` viewed as `[rows, n_heads, head_dim]`.
pub fn rope(x: &mut [f32], positions: &[u32], n_heads: usize, head_dim: usize, rope: &RopeParams) {
    let freqs = inv_freqs(rope);
    let half = rope.dim / 2;
    let row_len = n_heads * head_dim;
    let apply = |(row, &pos): (&mut [f32], &u32)| {
        let cs: Vec<(f32, f32)> = freqs
            .iter()
            .map(|f| {
                let a = pos as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for head in row.chunks_mut(head_dim) {
            match rope.style {
                RopeStyle::Interleaved => {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c - b * s;
                        head[2 * i + 1] = a * s + b * c;
                    }
                }
                RopeStyle::NeoX => {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c - b * s;
                        head[i + half] = a * s + b * c;
                    }
                }
            }
        }
    };
    if positions.len() >= 64 {
        x.par_chunks_mut(row_len)
            .zip(positions.par_iter())
            .for_each(apply);
    } else {
        x.chunks_mut(row_len).zip(positions.iter()).for_each(apply);
    }
}

/// `silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let y = rms_norm(&x, 4, &[1.0, 1.0, 2.0, 2.0], 0.0);
        let rms = (25.0f32 / 4.0).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 4.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_styles_agree_after_permutation_and_keep_norms() {
        // Interleaved rotation of a permuted head equals NeoX rotation of the original head.
        let d = 8;
        let v: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        // permutation used by GGUF llama: interleave halves (x0, x4, x1, x5, ...)
        let perm: Vec<f32> = (0..d)
            .map(|j| {
                if j % 2 == 0 {
                    v[j / 2]
                } else {
                    v[d / 2 + j / 2]
                }
            })
            .collect();
        let p = RopeParams {
            style: RopeStyle::NeoX,
            theta: 10000.0,
            dim: d,
        };
        let mut a = v.clone();
        rope(&mut a, &[7], 1, d, &p);
        let mut b = perm.clone();
        rope(
            &mut b,
            &[7],
            1,
            d,
            &RopeParams {
                style: RopeStyle::Interleaved,
                ..p
            },
        );
        for j in 0..d {
            let expect = if j % 2 == 0 {
                a[j / 2]
            } else {
                a[d / 2 + j / 2]
            };
            assert!((b[j] - expect).abs() < 1e-5);
        }
        let n0: f32 = v.iter().map(|x| x * x).sum();
        let n1: f32 = a.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-3);
        // position 0 is the identity
        let mut c = v.clone();
        rope(&mut c, &[0], 1, d, &p);
        assert_eq!(c, v);
    }
}
