//! The vocabulary shared by every retrowave crate: element types of stored tensors, borrowed views
//! of weights, and the backend trait that the model forward is written against.

pub mod dtype;

pub use dtype::TensorType;
