//! `tessera worker --join HEAD:PORT`: starts this machine's node (its replicas and trainers on its
//! own devices, its own model path) and joins the head's cluster; redials with backoff while the
//! head is away; Ctrl-C or SIGTERM leaves cleanly.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_actors::cluster::worker;
use tessera_actors::{Node, NodeConfig};

use crate::cli::WorkerArgs;
use crate::config::Config;
use crate::head::{node_config, termination};

/// A node name no other live worker has: host, process id and a random suffix.
fn unique_name(hostname: &str) -> String {
    let host: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-rt")
        .build()?;
    runtime.block_on(async {
        let hostname = sysinfo::System::host_name().unwrap_or_else(|| "worker".into());
        let host = match config.cluster.node_name.as_str() {
            "" => hostname.clone(),
            n => n.to_string(),
        };
        // With TLS the head accepts only a name this node's certificate bears: say so here.
        if let Some(tls) = config.cluster.tls() {
            let skip = std::env::var("TESSERA_TEST_HOOKS").as_deref() == Ok("1")
                && std::env::var("TESSERA_TEST_SKIP_NAME_CHECK").as_deref() == Ok("1");
            if !skip {
                tls.check_name(&host).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        let name = unique_name(&host);
        // A worker with no model of its own (`model.path` unset) serves the head's.
        let model = (!config.model.path.is_empty()).then(|| config.model_path());
        tracing::info!(node = %name, head = %args.join, model = ?model, "tessera worker: joining");
        let node_config = {
            let mut c = node_config(config, &name);
            c.job_manager = false;
            // The head learns a worker's replicas when it joins; they do not change afterwards.
            c.autoscaling = None;
            c
        };
        // Every path the head sends must lie inside this worker's own roots.
        let roots = tessera_actors::cluster::confine::WorkerRoots::new(
            &config.models_root(),
            &crate::config::expand_home(&config.training.data_root),
            &crate::config::expand_home(&config.adapters.root),
        )
        .map_err(|e| {
            anyhow::anyhow!("creating model.models_root / training.data_root / adapters.root: {e}")
        })?;
        let own_model = model.is_some();
        let start_roots = roots.clone();
        let start = move |path: PathBuf| async move {
            // The head's model (this worker has none of its own) must lie in its models root.
            if !own_model {
                start_roots.model(&path).map_err(|e| {
                    format!("{e}; or set model.path on this worker (--model)")
                })?;
            }
            start_roots.set_served(&path);
            if !path.exists() {
                return Err(format!(
                    "model.path: {} does not exist on this worker (shared storage, or set model.path / --model)",
                    path.display()
                ));
            }
            let node = Node::start(NodeConfig {
                model_path: path,
                ..node_config
            })
            .await
            .map_err(|e| format!("starting the worker's actor tree: {e}"))?;
            Ok(Arc::new(node))
        };
        let (node, result) = worker::run(
            worker::JoinOptions {
                name,
                hostname,
                head_addr: args.join.clone(),
                cookie: config.cluster.cookie.clone(),
                model,
                bind: config
                    .cluster
                    .bind
                    .parse()
                    .map_err(|e| anyhow::anyhow!("cluster.bind: {e}"))?,
                tls: config.cluster.tls(),
                roots,
                leave_grace: std::time::Duration::from_secs(config.server.shutdown_grace_secs),
            },
            start,
            termination(),
        )
        .await;
        if let Some(node) = node {
            node.shutdown(std::time::Duration::from_secs(
                config.server.shutdown_grace_secs,
            ))
            .await;
        }
        result.map_err(|e| anyhow::anyhow!("{e}"))
    })
}
