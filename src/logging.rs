//! Structured logs: human-readable lines on a terminal, bunyan-formatted JSON on stdout otherwise
//! (`log.format = "auto"`), or either as configured.
//! `RUST_LOG` wins over the configured level. Commands whose stdout is their output (`generate`,
//! `train`) log to stderr instead.

use std::io::IsTerminal;

use tracing_bunyan_formatter::{BunyanFormattingLayer, JsonStorageLayer};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(format: LogFormat, level: &str, json_to_stderr: bool) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        // ractor logs every actor start and stop at info: keep those for RUST_LOG=ractor=info.
        .or_else(|_| EnvFilter::try_new(format!("{level},ractor=warn")))
        .map_err(|e| anyhow::anyhow!("invalid log level `{level}` (log.level): {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let on_terminal = if json_to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let format = match format {
        LogFormat::Auto if on_terminal => LogFormat::Pretty,
        LogFormat::Auto => LogFormat::Json,
        other => other,
    };
    match format {
        LogFormat::Json => registry
            .with(JsonStorageLayer)
            .with(BunyanFormattingLayer::new(
                "tessera".into(),
                if json_to_stderr {
                    BoxMakeWriter::new(std::io::stderr)
                } else {
                    BoxMakeWriter::new(std::io::stdout)
                },
            ))
            .try_init()?,
        LogFormat::Pretty | LogFormat::Auto => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
    }
    Ok(())
}
