//! The vocabulary shared by every retrowave crate: element types of stored tensors, borrowed views
//! of weights, and the backend trait that the model forward is written against.

pub mod backend;
pub mod dtype;
pub mod quant;
pub mod wave;
pub mod weights;

pub use backend::{
    Backend, BackendError, BatchLayout, Collective, HeadLayout, HostGroup, RopeParams, RopeStyle,
    RowSampling, SeqRows, join_col_blocks, vector_f32,
};
pub use dtype::TensorType;
pub use wave::{
    AttentionMode, ClusterKv, ClusterStore, FidelitySample, HeadKey, StoreError, WaveConfig,
    WaveStats,
};
pub use weights::WeightView;
