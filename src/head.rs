//! `tessera head`: starts this node's actor tree and serves the HTTP facade until SIGTERM or
//! Ctrl-C, then shuts down gracefully within the grace period: at once and together, stop
//! accepting and let in-flight requests finish, checkpoint running jobs and end job event streams;
//! then stop the actors (a few seconds at most).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_actors::cluster::head::{HeadCluster, HeadClusterOptions};
use tessera_actors::{Node, NodeConfig};
use tokio::net::TcpListener;

use crate::config::{expand_home, Config, DtypeSetting};
use crate::http::listener::CappedListener;
use crate::http::metrics::Metrics;
use crate::http::paths::Roots;
use crate::http::{app, AppState, Shared};

/// The node configuration of this process's config.
pub fn node_config(config: &Config, node_name: &str) -> NodeConfig {
    let r = &config.resources;
    NodeConfig {
        node_name: node_name.to_string(),
        model_path: config.model_path(),
        kind: match config.model.dtype {
            DtypeSetting::Auto => None,
            DtypeSetting::F32 => Some(tch::Kind::Float),
            DtypeSetting::F16 => Some(tch::Kind::Half),
            DtypeSetting::Bf16 => Some(tch::Kind::BFloat16),
        },
        engine: config.engine_config(),
        inference_fraction: r.inference_gpu_fraction,
        training_fraction: r.training_gpu_fraction,
        cpu_inference_slots: r.cpu_inference_slots as usize,
        cpu_training_slots: r.cpu_training_slots as usize,
        tensor_parallel: r.tensor_parallel as usize,
        db_path: expand_home(&config.jobs.db_path),
        restart: config.supervision.clone(),
        affinity_slack: config.adapters.affinity_slack as usize,
        max_in_flight: config.max_in_flight(),
        job_manager: true,
        max_attempts: config.jobs.max_attempts,
        max_queued_jobs: config.jobs.max_queued as usize,
        max_deployments: config.deployments.max.max(1) as usize,
        host_memory_limit: (r.host_memory_limit_mb > 0.0)
            .then_some((r.host_memory_limit_mb * (1u64 << 20) as f64) as u64),
        tags: config.resources.tags.clone(),
        max_dataset_bytes: config.training.max_dataset_bytes,
        autoscaling: config.autoscaling.config(),
        deployment_name: config.deployment_name(),
        quantization: config.model.quantization,
        default_replicas: config.model.replicas as usize,
        trainer_threads: match config.resources.cpu_threads_per_trainer {
            0 => None,
            n => Some(n as usize),
        },
    }
}

/// Starts the node and builds the app state.
pub async fn start(config: &Config) -> anyhow::Result<AppState> {
    let model = config.model_path();
    if !model.exists() {
        anyhow::bail!(
            "model.path: {} does not exist (run scripts/fetch-model.sh for the default model, or set model.path)",
            model.display()
        );
    }
    let roots = Roots::new(
        &expand_home(&config.adapters.root),
        &expand_home(&config.training.data_root),
        &config.models_root(),
        &model,
    )
    .context("creating adapters.root / training.data_root / model.models_root")?;
    let node = Node::start(node_config(config, "head"))
        .await
        .context("starting the actor tree")?;
    let c = &config.cluster;
    let cluster = HeadCluster::start(
        HeadClusterOptions {
            model_path: model,
            deployments: node.deployments.clone(),
            bind: c.bind.parse().context("cluster.bind")?,
            port: c.port,
            cookie: c.cookie.clone(),
            heartbeat_timeout: Duration::from_secs(c.heartbeat_timeout_secs),
            handshake_timeout: Duration::from_secs(c.handshake_timeout_secs),
            max_connections: c.max_connections as usize,
            tls: c.tls(),
        },
        node.router.clone(),
        node.directory.clone(),
        node.health.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let token = config.server.auth_token.clone();
    Ok(AppState::new(Shared {
        node: Arc::new(node),
        cluster: Some(cluster),
        roots,
        auth_token: (!token.is_empty()).then_some(token),
        allowed_hosts: config.server.allowed_hosts.clone(),
        max_dataset_bytes: config.training.max_dataset_bytes,
        cold_start_queue: config.autoscaling.cold_start_queue as usize,
        request_timeout: Duration::from_secs(config.server.request_timeout_secs),
        failover: tessera_actors::failover::Failover::new(config.server.request_retries as usize),
        max_body_bytes: config.server.max_body_bytes as usize,
        body_read_timeout: Duration::from_secs(config.server.body_read_timeout_secs),
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
        max_connections: config.server.max_connections as usize,
        adapter_budget_bytes: config.adapters.cache_memory_mb << 20,
        metrics: Metrics::new(),
        test_hooks: std::env::var("TESSERA_TEST_HOOKS").is_ok_and(|v| v == "1"),
        started: Instant::now(),
    }))
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains and stops the node.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let node = state.node.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = CappedListener::new(listener, state.max_connections);
    let header_read_timeout = state.header_read_timeout;
    let server =
        crate::http::server::serve(listener, app(state), header_read_timeout, async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; finishing in-flight requests");
            let _ = stop_tx.send(());
        });
    let mut server = std::pin::pin!(server);
    tokio::select! {
        () = &mut server => {}
        _ = stop_rx => {
            // Both at once, each within the grace period: running jobs stop at a checkpoint (and
            // their event streams end, so they do not hold the drain), in-flight requests finish;
            // past the grace they are cut (their sequences are cancelled as their streams drop).
            let http = async {
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    tracing::warn!(grace_s = grace.as_secs_f64(), "in-flight requests still running after the grace period; cancelling them");
                }
            };
            tokio::join!(node.checkpoint_jobs(grace), http);
        }
    }
    node.stop_actors(ACTOR_STOP_TIMEOUT).await;
    tracing::info!("stopped");
    Ok(())
}

/// The most the actors get to stop once requests and jobs are done.
const ACTOR_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn run(config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-rt")
        .build()?;
    let result = runtime.block_on(async {
        let addr = format!("{}:{}", config.server.bind, config.server.port);
        // Bind first: a taken port fails fast, before the model loads.
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("server.bind/server.port: cannot listen on {addr}"))?;
        let state = start(config).await?;
        tracing::info!(
            address = %listener.local_addr()?,
            model = %config.model_path().display(),
            replicas = state.node.placement.replicas.len(),
            trainers = state.node.placement.trainers.len(),
            cluster_port = state.cluster.as_ref().map(|c| c.port),
            auth = state.auth_token.is_some(),
            "tessera head serving"
        );
        serve(
            state,
            listener,
            termination(),
            Duration::from_secs(config.server.shutdown_grace_secs),
        )
        .await
    });
    // Blocking tasks still running (a model load, a tokenizer call) do not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
