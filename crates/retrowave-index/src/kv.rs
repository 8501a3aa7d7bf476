//! Borrowed views of the keys and values of one KV head of one sequence.

use thiserror::Error;

/// The dimensions of one attention head: the length of a key (and query) row and of a value row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeadDims {
    /// Floats per key row (equal to the query head dimension).
    pub key_dim: usize,
    /// Floats per value row.
    pub value_dim: usize,
}

/// A buffer whose length does not match the dimensions it was given with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShapeError {
    /// A head dimension of zero.
    #[error("head dimensions must be non-zero, got key_dim {key_dim} and value_dim {value_dim}")]
    ZeroDim {
        /// The key dimension given.
        key_dim: usize,
        /// The value dimension given.
        value_dim: usize,
    },
    /// A buffer that is not a whole number of rows.
    #[error("{what} has {len} floats, which is not a whole number of rows of {row} floats")]
    Ragged {
        /// Which buffer.
        what: &'static str,
        /// Its length in floats.
        len: usize,
        /// The row length it should be a multiple of.
        row: usize,
    },
    /// A buffer of the wrong length.
    #[error("{what} has {got} floats, expected {expected}")]
    Len {
        /// Which buffer.
        what: &'static str,
        /// Its length in floats.
        got: usize,
        /// The length it should have.
        expected: usize,
    },
    /// More tokens than 32-bit token ids can name.
    #[error(
        "the sequence has {n_tokens} tokens; token ids are 32-bit, so at most {max} are allowed"
    )]
    TooManyTokens {
        /// Tokens in the sequence.
        n_tokens: usize,
        /// The largest supported count.
        max: usize,
    },
    /// A token id or range beyond the end of the sequence.
    #[error("tokens {start}..{end} are out of range: the sequence has {n_tokens} tokens")]
    TokenOutOfRange {
        /// First token asked for.
        start: usize,
        /// One past the last token asked for.
        end: usize,
        /// Tokens in the sequence.
        n_tokens: usize,
    },
}

/// The keys `[n_tokens, key_dim]` and values `[n_tokens, value_dim]` (row-major) of one KV head of
/// one sequence; row `i` belongs to token `i`.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    dims: HeadDims,
    n_tokens: usize,
}

impl<'a> KvView<'a> {
    /// Wraps `keys` and `values`, checking that both hold the same whole number of rows.
    pub fn new(keys: &'a [f32], values: &'a [f32], dims: HeadDims) -> Result<Self, ShapeError> {
        check_dims(dims)?;
        if !keys.len().is_multiple_of(dims.key_dim) {
            return Err(ShapeError::Ragged {
                what: "keys",
                len: keys.len(),
                row: dims.key_dim,
            });
        }
        let n_tokens = keys.len() / dims.key_dim;
        if n_tokens > u32::MAX as usize {
            return Err(ShapeError::TooManyTokens {
                n_tokens,
                max: u32::MAX as usize,
            });
        }
        let expected = n_tokens * dims.value_dim;
        if values.len() != expected {
            return Err(ShapeError::Len {
                what: "values",
                got: values.len(),
                expected,
            });
        }
        Ok(Self {
            keys,
            values,
            dims,
            n_tokens,
        })
    }

    /// Tokens in the view.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// The head dimensions.
    pub fn dims(&self) -> HeadDims {
        self.dims
    }

    /// All keys, row-major.
    pub fn keys(&self) -> &'a [f32] {
        self.keys
    }

    /// All values, row-major.
    pub fn values(&self) -> &'a [f32] {
        self.values
    }

    /// The key of `token`, or `None` beyond the end.
    pub fn key(&self, token: usize) -> Option<&'a [f32]> {
        let d = self.dims.key_dim;
        self.keys
            .get(token.checked_mul(d)?..token.checked_add(1)?.checked_mul(d)?)
    }

    /// The value of `token`, or `None` beyond the end.
    pub fn value(&self, token: usize) -> Option<&'a [f32]> {
        let d = self.dims.value_dim;
        self.values
            .get(token.checked_mul(d)?..token.checked_add(1)?.checked_mul(d)?)
    }

    /// Checks that `start..end` lies inside the sequence.
    pub(crate) fn check_range(&self, start: usize, end: usize) -> Result<(), ShapeError> {
        if start > end || end > self.n_tokens {
            return Err(ShapeError::TokenOutOfRange {
                start,
                end,
                n_tokens: self.n_tokens,
            });
        }
        Ok(())
    }

    /// The key of a token already checked to be in range.
    pub(crate) fn key_row(&self, token: usize) -> &'a [f32] {
        let d = self.dims.key_dim;
        &self.keys[token * d..(token + 1) * d]
    }

    /// The value of a token already checked to be in range.
    pub(crate) fn value_row(&self, token: usize) -> &'a [f32] {
        let d = self.dims.value_dim;
        &self.values[token * d..(token + 1) * d]
    }
}

/// Rejects zero head dimensions.
pub(crate) fn check_dims(dims: HeadDims) -> Result<(), ShapeError> {
    if dims.key_dim == 0 || dims.value_dim == 0 {
        return Err(ShapeError::ZeroDim {
            key_dim: dims.key_dim,
            value_dim: dims.value_dim,
        });
    }
    Ok(())
}

/// Inner product accumulated in f64.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_checks_shapes() {
        let dims = HeadDims {
            key_dim: 2,
            value_dim: 3,
        };
        let keys = [0.0f32; 6];
        let values = [0.0f32; 9];
        let kv = KvView::new(&keys, &values, dims).unwrap();
        assert_eq!(kv.n_tokens(), 3);
        assert_eq!(kv.key(2).map(<[f32]>::len), Some(2));
        assert!(kv.key(3).is_none());
        assert!(kv.value(usize::MAX).is_none());
        assert!(matches!(
            KvView::new(&keys[..5], &values, dims),
            Err(ShapeError::Ragged { .. })
        ));
        assert!(matches!(
            KvView::new(&keys, &values[..6], dims),
            Err(ShapeError::Len { expected: 9, .. })
        ));
        let zero = HeadDims {
            key_dim: 0,
            value_dim: 3,
        };
        assert!(matches!(
            KvView::new(&keys, &values, zero),
            Err(ShapeError::ZeroDim { .. })
        ));
    }
}
