//! `retrowave eval`: RULER-style long-context accuracy tasks (needle in a haystack, variable
//! tracking) generated over a haystack of essays, or loaded from a JSONL file, and scored by
//! substring match; full and wave attention run on the same cases side by side.

pub mod cli;
pub mod data;
pub mod run;
pub mod tasks;
