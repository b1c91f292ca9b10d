//! The `tessera` binary's library half: CLI, configuration, logging and the commands, kept apart
//! from `main` so tests drive them directly.

pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
pub mod generate;
pub mod head;
pub mod http;
pub mod logging;
pub mod models;
pub mod status;
pub mod train;
pub mod worker;
