//! Page layout of a cluster record.
//!
//! A cluster of `n` tokens is stored as `ceil(n / page_tokens)` pages, one after the other. A page
//! holds the keys of its `page_tokens` tokens (`[page_tokens, head_dim]`) followed by their values
//! (same shape); the last page of a cluster is zero-padded. Elements are opaque 2-byte values
//! (f16 or bf16), so a record is a plain byte string that the host arena, the disk tier and the
//! GPU copy verbatim.

/// The shape of the pages of one (layer, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageLayout {
    /// Elements per key or value vector.
    pub head_dim: u32,
    /// Tokens per page.
    pub page_tokens: u32,
    /// Bytes per element (2 for f16 and bf16).
    pub elem_bytes: u32,
}

impl PageLayout {
    /// The layout of f16/bf16 pages.
    pub fn half(head_dim: u32, page_tokens: u32) -> Self {
        PageLayout {
            head_dim,
            page_tokens,
            elem_bytes: 2,
        }
    }

    /// Bytes of one key (or value) vector.
    pub fn vector_bytes(&self) -> usize {
        self.head_dim as usize * self.elem_bytes as usize
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        2 * self.page_tokens as usize * self.vector_bytes()
    }

    /// Pages of a cluster of `tokens` tokens.
    pub fn pages_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.page_tokens)
    }

    /// Bytes of the record of a cluster of `tokens` tokens.
    pub fn record_bytes(&self, tokens: u32) -> usize {
        self.pages_for(tokens) as usize * self.page_bytes()
    }

    /// Writes the record of one cluster: `keys` and `values` are `[tokens, head_dim]` byte
    /// arrays; `dst` is `record_bytes(tokens)` long.
    pub fn pack(&self, keys: &[u8], values: &[u8], tokens: u32, dst: &mut [u8]) {
        let vb = self.vector_bytes();
        let half = self.page_tokens as usize * vb;
        debug_assert_eq!(keys.len(), tokens as usize * vb);
        debug_assert_eq!(values.len(), tokens as usize * vb);
        debug_assert_eq!(dst.len(), self.record_bytes(tokens));
        for (p, page) in dst.chunks_exact_mut(self.page_bytes()).enumerate() {
            let from = p * half;
            let to = (from + half).min(keys.len());
            let n = to - from;
            let (pk, pv) = page.split_at_mut(half);
            pk[..n].copy_from_slice(&keys[from..to]);
            pk[n..].fill(0);
            pv[..n].copy_from_slice(&values[from..to]);
            pv[n..].fill(0);
        }
    }

    /// Splits a record back into keys and values, each `[tokens, head_dim]` bytes, appended to
    /// `keys` and `values`.
    pub fn unpack(&self, record: &[u8], tokens: u32, keys: &mut Vec<u8>, values: &mut Vec<u8>) {
        let vb = self.vector_bytes();
        let half = self.page_tokens as usize * vb;
        let mut left = tokens as usize * vb;
        for page in record.chunks_exact(self.page_bytes()) {
            let n = left.min(half);
            keys.extend_from_slice(&page[..n]);
            values.extend_from_slice(&page[half..half + n]);
            left -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_with_padding() {
        let l = PageLayout::half(4, 8);
        assert_eq!(l.page_bytes(), 2 * 8 * 4 * 2);
        for tokens in [1u32, 7, 8, 9, 16, 17] {
            let n = tokens as usize * l.vector_bytes();
            let keys: Vec<u8> = (0..n).map(|i| (i * 7 + 1) as u8).collect();
            let values: Vec<u8> = (0..n).map(|i| (i * 13 + 5) as u8).collect();
            let mut rec = vec![0xAAu8; l.record_bytes(tokens)];
            l.pack(&keys, &values, tokens, &mut rec);
            assert_eq!(rec.len() % l.page_bytes(), 0);
            // Keys of token 0 open the record; values of token 0 open the second half-page.
            assert_eq!(&rec[..8], &keys[..8]);
            assert_eq!(&rec[64..72], &values[..8]);
            let (mut k, mut v) = (Vec::new(), Vec::new());
            l.unpack(&rec, tokens, &mut k, &mut v);
            assert_eq!(k, keys);
            assert_eq!(v, values);
            // Padding is zero, never stale bytes.
            let used = tokens as usize % 8;
            if used != 0 {
                let last = &rec[rec.len() - l.page_bytes()..];
                assert!(last[used * 8..64].iter().all(|&b| b == 0));
                assert!(last[64 + used * 8..].iter().all(|&b| b == 0));
            }
        }
    }
}
