//! Times `ClusterIndex::build` on real-size inputs (single thread):
//! 8192 tokens x key_dim 64 (one segment of 512 clusters) and 32768 tokens x key_dim 128
//! (four segments of 8192 tokens, 512 clusters each, then the global assignment against all
//! 2048 centroids), 9 iterations each.
//!
//! Run with `cargo run -p retrowave-index --release --example kmeans_bench`.

use std::time::Instant;

use retrowave_index::{ClusterIndex, HeadDims, KvView, WaveConfig};

/// xorshift64*: one seed gives one data set.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Keys drawn around 64 random directions (like real keys, which are far from uniform).
fn keys(n: usize, d: usize, rng: &mut Rng) -> Vec<f32> {
    let centres: Vec<f32> = (0..64 * d).map(|_| 2.0 * rng.float()).collect();
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let c = (rng.next() % 64) as usize;
        for k in 0..d {
            out.push(centres[c * d + k] + 0.5 * rng.float());
        }
    }
    out
}

fn time(n: usize, d: usize, repeats: usize) {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let keys = keys(n, d, &mut rng);
    let dv = d;
    let values: Vec<f32> = (0..n * dv).map(|_| rng.float()).collect();
    let dims = HeadDims {
        key_dim: d,
        value_dim: dv,
    };
    let kv = KvView::new(&keys, &values, dims).expect("shapes");
    let cfg = WaveConfig {
        sink_tokens: 0,
        window_tokens: 0,
        ..WaveConfig::published()
    };
    let mut best = f64::INFINITY;
    let mut clusters = 0;
    let mut checksum = 0u64;
    for _ in 0..repeats {
        let start = Instant::now();
        let index = ClusterIndex::build(&kv, &cfg).expect("build");
        best = best.min(start.elapsed().as_secs_f64());
        clusters = index.n_clusters();
        checksum = index
            .all_members()
            .iter()
            .enumerate()
            .fold(0u64, |h, (i, &t)| {
                h.wrapping_mul(31).wrapping_add((i as u64) ^ u64::from(t))
            });
        checksum ^= index
            .sizes()
            .iter()
            .fold(0u64, |h, &s| h.wrapping_mul(131) + u64::from(s));
    }
    let segments = n.div_ceil(cfg.segment_tokens);
    let per_segment = cfg.clusters_for_segment(n.min(cfg.segment_tokens), n) as f64;
    let fma = segments as f64
        * cfg.kmeans_iterations as f64
        * (n / segments) as f64
        * per_segment
        * d as f64
        + n as f64 * clusters as f64 * d as f64;
    println!(
        "{n} x {d}: {clusters} clusters, best of {repeats}: {:.3} s, {:.2} GFMA/s, checksum {checksum:016x}",
        best,
        fma / best / 1e9
    );
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    time(8192, 64, repeats);
    time(32768, 128, repeats.div_ceil(2));
}
