//! Tessera's model engine: everything that touches tensors. No actors, no HTTP.
//!
//! * [`gguf`], [`gguf_writer`], [`dequant`]: llama.cpp's GGUF files, read, written, dequantised.
//! * [`weights`], [`loader`]: a model path into weights on their devices.
//! * [`tokenizer`], [`chat_template`]: text in and out.
//! * [`model`], [`kv_cache`]: the tensor-parallel Llama decoder and its cache.
//! * [`lora`], [`adapter_cache`]: PEFT adapters, applied per batch row without merging.
//! * [`sampling`], [`sequence`], [`scheduler`], [`engine`]: continuous batching and streaming.
//! * [`allocator`]: freed memory handed back after a job; opt-in jemalloc for the whole process.

pub mod adapter_cache;
pub mod allocator;
pub mod batch_size;
pub mod chat_template;
pub mod constraint;
mod cpu;
pub mod dequant;
pub mod dequant_k;
pub mod engine;
pub mod fingerprint;
pub mod float_dot;
pub mod footprint;
pub mod gguf;
pub mod gguf_writer;
pub mod int_dot;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod lora_bank;
pub mod model;
pub mod packed;
pub mod prefix_cache;
pub mod q8_weight;
pub mod regular_file;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod step;
#[cfg(test)]
mod test_rng;
pub mod threads;
pub mod tokenizer;
pub mod tool_calls;
pub mod train;
pub mod vec_exp;
pub mod weights;

pub use chat_template::{ChatMessage, MessageToolCall};
pub use engine::{Engine, EngineConfig, GenerateRequest, Generation, SubmitError};
pub use loader::{load, LoadedModel};
pub use sampling::SamplingParams;
pub use sequence::{Event, FailKind, FinishReason};
