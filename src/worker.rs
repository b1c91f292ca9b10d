//! `tessera worker --join HEAD:PORT`: starts this machine's node (its replicas and trainers on its
//! own devices, its own model path) and joins the head's cluster; redials with backoff while the
//! head is away; Ctrl-C or SIGTERM leaves cleanly.

use std::sync::Arc;

use anyhow::Context;
use tessera_actors::cluster::worker;
use tessera_actors::Node;

use crate::cli::WorkerArgs;
use crate::config::Config;
use crate::head::{node_config, termination};

/// A node name no other live worker has: host, process id and a random suffix.
fn unique_name(hostname: &str) -> String {
    let host: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{suffix}", std::process::id())
}

pub fn run(args: WorkerArgs, config: &Config) -> anyhow::Result<()> {
    let model = config.model_path();
    if !model.exists() {
        anyhow::bail!(
            "model.path: {} does not exist on this worker (run scripts/fetch-model.sh, or set model.path / --model)",
            model.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-rt")
        .build()?;
    runtime.block_on(async {
        let hostname = sysinfo::System::host_name().unwrap_or_else(|| "worker".into());
        let name = unique_name(&hostname);
        let mut node_config = node_config(config, &name);
        node_config.job_manager = false;
        let node = Arc::new(
            Node::start(node_config)
                .await
                .context("starting the worker's actor tree")?,
        );
        tracing::info!(node = %name, head = %args.join, replicas = node.placement.replicas.len(), trainers = node.placement.trainers.len(), "tessera worker: joining");
        let result = worker::run(
            node.clone(),
            hostname,
            args.join.clone(),
            config.cluster.cookie.clone(),
            termination(),
        )
        .await;
        node.shutdown(std::time::Duration::from_secs(
            config.server.shutdown_grace_secs,
        ))
        .await;
        result.map_err(|e| anyhow::anyhow!("cluster.cookie / --join: {e}"))
    })
}
