//! Borrowed views of stored weight tensors.
//!
//! A [`WeightView`] is what a model file (GGUF or a Hugging Face folder) hands to a backend: the
//! raw bytes of one tensor, its storage type and its 2-D shape. Vectors (norm weights, biases)
//! are views with one row.

use crate::TensorType;

/// Why a [`WeightView`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightViewError {
    /// The row length is not a whole number of quantization blocks of the type.
    #[error(
        "tensor {name}: row length {cols} is not a multiple of the {dtype} block size {block_size}"
    )]
    PartialBlock {
        name: String,
        dtype: TensorType,
        cols: usize,
        block_size: usize,
    },
    /// The byte length does not match `rows x row_bytes`.
    #[error(
        "tensor {name}: {rows} rows of {cols} {dtype} elements need {expected} bytes, found {found}"
    )]
    WrongLength {
        name: String,
        dtype: TensorType,
        rows: usize,
        cols: usize,
        expected: u64,
        found: usize,
    },
}

/// A weight tensor as stored: `rows` rows (output features; 1 for vectors) of `cols` contiguous
/// elements (input features), each row `dtype.row_bytes(cols)` bytes long, rows back to back.
///
/// The fields are public for convenience; views built by the model loaders (and by
/// [`WeightView::new`]) always satisfy `data.len() == rows * row_bytes()`.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    /// The tensor name, in GGUF naming (`blk.0.attn_q.weight`).
    pub name: &'a str,
    /// Storage type of the elements.
    pub dtype: TensorType,
    /// Number of rows (output features); 1 for vectors.
    pub rows: usize,
    /// Elements per row (input features), the contiguous dimension.
    pub cols: usize,
    /// The stored bytes, `rows * row_bytes()` long.
    pub data: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// Builds a view, checking that `cols` is a whole number of blocks and that `data` holds
    /// exactly `rows` rows.
    pub fn new(
        name: &'a str,
        dtype: TensorType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, WeightViewError> {
        let row_bytes =
            dtype
                .row_bytes(cols as u64)
                .ok_or_else(|| WeightViewError::PartialBlock {
                    name: name.to_string(),
                    dtype,
                    cols,
                    block_size: dtype.block_size(),
                })?;
        let expected = row_bytes.checked_mul(rows as u64);
        if expected != Some(data.len() as u64) {
            return Err(WeightViewError::WrongLength {
                name: name.to_string(),
                dtype,
                rows,
                cols,
                expected: expected.unwrap_or(u64::MAX),
                found: data.len(),
            });
        }
        Ok(Self {
            name,
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row (0 if `cols` is not a whole number of blocks, which validated views exclude).
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols as u64).unwrap_or(0) as usize
    }

    /// Number of elements, `rows * cols`.
    pub fn n_elements(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// Whether this is a vector (one row).
    pub fn is_vector(&self) -> bool {
        self.rows == 1
    }

    /// The bytes of row `i`, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&'a [u8]> {
        let rb = self.row_bytes();
        let start = i.checked_mul(rb)?;
        let end = start.checked_add(rb)?;
        self.data.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length_and_blocks_and_rows_slice() {
        let data: Vec<u8> = (0..(3 * 20) as u8).collect();
        let w = WeightView::new("w", TensorType::Q4_1, 3, 32, &data).unwrap();
        assert_eq!(w.row_bytes(), 20);
        assert_eq!(w.row(1), Some(&data[20..40]));
        assert_eq!(w.row(3), None);
        assert_eq!(w.row(usize::MAX), None);
        assert_eq!(w.n_elements(), 96);
        assert!(!w.is_vector());

        let err = WeightView::new("w", TensorType::Q4_1, 2, 32, &data).unwrap_err();
        assert!(matches!(
            err,
            WeightViewError::WrongLength {
                expected: 40,
                found: 60,
                ..
            }
        ));
        let err = WeightView::new("w", TensorType::Q4_1, 1, 33, &data).unwrap_err();
        assert!(matches!(
            err,
            WeightViewError::PartialBlock { cols: 33, .. }
        ));
        assert!(err.to_string().contains("not a multiple"));
    }
}
