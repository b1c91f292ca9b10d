//! LoRA supervised fine-tuning on the inference engine's own model code, with tch alone (no PEFT):
//! job input ([`hyperparams`]), datasets ([`dataset`]), trainable LoRA saved in PEFT's format
//! ([`lora_params`]), AdamW and schedules ([`optimizer`]), the loop ([`trainer`]) and what it
//! writes, durably and fenced by attempt ([`checkpoint`]).

pub mod checkpoint;
pub mod dataset;
pub mod hyperparams;
pub mod lora_params;
pub mod optimizer;
pub mod trainer;

pub use hyperparams::{BaseQuantization, Hyperparameters, LrScheduler, TrainJob};
pub use trainer::{train, Progress, TrainError, TrainOptions, TrainOutcome, TrainSummary};
