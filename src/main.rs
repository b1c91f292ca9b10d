//! The `tessera` binary: parses the command line, loads the configuration, starts logging and runs
//! the chosen role.

use anyhow::Context;
use clap::Parser;

use tessera::cli::{Cli, Command};
use tessera::config::{Config, Sources};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&Sources::from_process(
        cli.global.config.clone(),
        cli.overrides(),
    ))
    .context("configuration")?;
    let output_on_stdout = matches!(
        cli.command,
        Command::Generate(_)
            | Command::Train(_)
            | Command::Chat(_)
            | Command::FineTune(_)
            | Command::Jobs(_)
            | Command::Models(_)
            | Command::Status(_)
    );
    tessera::logging::init(config.log.format, &config.log.level, output_on_stdout)?;

    match cli.command {
        Command::Doctor => {
            print!("{}", tessera::doctor::report(&config));
            Ok(())
        }
        Command::Generate(args) => tessera::generate::run(args, &config),
        Command::Train(args) => tessera::train::run(args, &config),
        Command::Chat(args) => tessera::client::exit_on_error(tessera::client::chat(args, &config)),
        Command::FineTune(args) => {
            tessera::client::exit_on_error(tessera::client::fine_tune(args, &config))
        }
        Command::Jobs(args) => tessera::client::exit_on_error(tessera::client::jobs(args, &config)),
        Command::Models(args) => {
            tessera::client::exit_on_error(tessera::models::run(args, &config))
        }
        Command::Status(args) => {
            tessera::client::exit_on_error(tessera::status::run(args, &config))
        }
        Command::Head(_) => tessera::head::run(&config),
        Command::Worker(args) => tessera::worker::run(args, &config),
    }
}
