//! The head's side of the cluster: our accept loop ([`gate`]) in front of a `ractor_cluster` node
//! server (star topology: workers dial in; cookie, and mutual TLS when configured), and the
//! `ClusterHead` actor that registers workers, puts their replicas in
//! the router and their trainers in the directory, carries token streams and job reports back,
//! pings every worker each second and evicts one that misses `heartbeat_timeout` (a crashed worker
//! is seen at once from its closed session; a hung or stopped one by the heartbeat).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::IpAddr;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::Serialize;
use tokio::sync::mpsc;

use super::gate::{self, Conns, GateConfig};
use super::sessions::{HeadPort, SessionEvents, Sessions};
use super::supervision::ClusterWatch;
use super::tls::TlsFiles;
use super::wire::{
    HeadFrame, HeadInbox, ToHead, ToWorker, WorkerInbox, WorkerInfo, CREDIT_BATCH, STREAM_WINDOW,
};
use crate::directory::{CurrentFuture, Directory, Trainer, TrainerEntry};
use crate::health::{now_s, ActorState, HealthBoard};
use crate::jobs::{Assignment, JobMsg};
use crate::messages::{ChatWork, ReplicaInfo, StreamEvent};
use crate::router::{Lease, Replica, Router};

/// A joined worker, for `/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub info: WorkerInfo,
    pub joined_at: f64,
    pub last_heartbeat: f64,
}

struct Worker {
    info: WorkerInfo,
    agent: ActorRef<WorkerInbox>,
    last_seen: Instant,
    joined_at: f64,
    last_heartbeat: f64,
}

#[derive(Default)]
struct Table {
    workers: HashMap<String, Worker>,
    /// request id → (node, the stream's sender).
    /// Remote streams: request id → (the node serving it, where its events go). Each channel
    /// holds the credit window: a worker honouring the credit never finds it full.
    streams: HashMap<String, (String, mpsc::Sender<StreamEvent>)>,
    /// "node/trainer" → the job it runs.
    trainer_jobs: HashMap<String, Option<(String, u32)>>,
}

/// Shared between the `ClusterHead` actor and the remote replica / trainer handles.
#[derive(Clone, Default)]
pub struct ClusterTable {
    inner: Arc<Mutex<Table>>,
}

impl ClusterTable {
    pub fn workers(&self) -> Vec<WorkerView> {
        self.inner
            .lock()
            .expect("cluster")
            .workers
            .values()
            .map(|w| WorkerView {
                info: w.info.clone(),
                joined_at: w.joined_at,
                last_heartbeat: w.last_heartbeat,
            })
            .collect()
    }
}

struct RemoteReplicaHandle {
    node: String,
    /// Its name on the worker.
    replica: String,
    agent: ActorRef<WorkerInbox>,
    table: ClusterTable,
}

impl Replica for RemoteReplicaHandle {
    fn generate(
        &self,
        work: ChatWork,
        sink: mpsc::Sender<StreamEvent>,
        lease: Lease,
    ) -> Result<(), (Option<Box<ChatWork>>, String)> {
        let request_id = work.request_id.clone();
        let (tx, mut rx) = mpsc::channel::<StreamEvent>(STREAM_WINDOW as usize + 1);
        self.table
            .inner
            .lock()
            .expect("cluster")
            .streams
            .insert(request_id.clone(), (self.node.clone(), tx));
        if let Err(e) = self.agent.cast(WorkerInbox::Frame(ToWorker::Generate {
            work: Box::new(work),
            replica: Some(self.replica.clone()),
        })) {
            self.table
                .inner
                .lock()
                .expect("cluster")
                .streams
                .remove(&request_id);
            let why = format!("node {}: {e}", self.node);
            return Err(match e {
                ractor::MessagingErr::SendErr(WorkerInbox::Frame(ToWorker::Generate {
                    work,
                    ..
                })) => (Some(work), why),
                _ => (None, why),
            });
        }
        // Events arrive from the worker into `tx`; this task hands them to the client's bounded
        // channel and tells the worker to stop when the client is gone.
        let agent = self.agent.clone();
        let table = self.table.clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            // The request counts as load on this replica until its stream ends here.
            let _lease = lease;
            let mut delivered = 0;
            while let Some(mut event) = rx.recv().await {
                if let StreamEvent::Started { replica, .. } = &mut event {
                    *replica = format!("{node}/{replica}");
                }
                if sink.send(event).await.is_err() {
                    let _ = agent.cast(WorkerInbox::Frame(ToWorker::Cancel {
                        request_id: request_id.clone(),
                    }));
                    break;
                }
                // Credit flows back only as the client takes events: a slow client holds the
                // worker to STREAM_WINDOW events in flight.
                delivered += 1;
                if delivered == CREDIT_BATCH {
                    delivered = 0;
                    let _ = agent.cast(WorkerInbox::Frame(ToWorker::Credit {
                        request_id: request_id.clone(),
                        n: CREDIT_BATCH,
                    }));
                }
            }
            table
                .inner
                .lock()
                .expect("cluster")
                .streams
                .remove(&request_id);
        });
        Ok(())
    }
}

struct RemoteTrainerHandle {
    node: String,
    trainer: String,
    agent: ActorRef<WorkerInbox>,
    table: ClusterTable,
}

impl RemoteTrainerHandle {
    fn key(&self) -> String {
        format!("{}/{}", self.node, self.trainer)
    }
}

impl Trainer for RemoteTrainerHandle {
    fn run(&self, assignment: Assignment) -> Result<(), String> {
        // Recorded before the cast: the worker's report must find it.
        let job = (assignment.job_id.clone(), assignment.attempt);
        let previous = self
            .table
            .inner
            .lock()
            .expect("cluster")
            .trainer_jobs
            .insert(self.key(), Some(job));
        let sent = self.agent.cast(WorkerInbox::Frame(ToWorker::RunJob {
            trainer: self.trainer.clone(),
            assignment: Box::new(assignment),
        }));
        if let Err(e) = sent {
            let mut t = self.table.inner.lock().expect("cluster");
            match previous {
                Some(p) => t.trainer_jobs.insert(self.key(), p),
                None => t.trainer_jobs.remove(&self.key()),
            };
            return Err(format!("node {}: {e}", self.node));
        }
        Ok(())
    }

    fn cancel(&self, job_id: &str, checkpoint: bool) {
        let _ = self.agent.cast(WorkerInbox::Frame(ToWorker::CancelJob {
            trainer: self.trainer.clone(),
            job_id: job_id.to_string(),
            checkpoint,
            stale_attempt: None,
        }));
    }

    fn fence(&self, job_id: &str, attempt: u32) {
        let _ = self.agent.cast(WorkerInbox::Frame(ToWorker::CancelJob {
            trainer: self.trainer.clone(),
            job_id: job_id.to_string(),
            checkpoint: false,
            stale_attempt: Some(attempt),
        }));
    }

    /// As the worker last reported it.
    fn current(&self) -> CurrentFuture {
        let job = self
            .table
            .inner
            .lock()
            .expect("cluster")
            .trainer_jobs
            .get(&self.key())
            .cloned()
            .flatten();
        Box::pin(std::future::ready(job))
    }
}

/// The workers' inference slots, for the deployment manager.
struct WorkerSlots {
    table: ClusterTable,
}

impl WorkerSlots {
    fn agent(&self, node: &str) -> Option<ActorRef<WorkerInbox>> {
        self.table
            .inner
            .lock()
            .expect("cluster")
            .workers
            .get(node)
            .map(|w| w.agent.clone())
    }
}

impl crate::deployments::RemoteNodes for WorkerSlots {
    fn nodes(&self) -> Vec<crate::deployments::RemoteNode> {
        let t = self.table.inner.lock().expect("cluster");
        let mut nodes: Vec<_> = t
            .workers
            .values()
            .map(|w| crate::deployments::RemoteNode {
                node: w.info.node.clone(),
                tags: w.info.tags.clone(),
                slots: w
                    .info
                    .placement
                    .replicas
                    .iter()
                    .map(|r| (r.name.clone(), r.devices.len()))
                    .collect(),
                busy: w.info.replicas.iter().map(|r| r.name.clone()).collect(),
            })
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }

    fn start(
        &self,
        node: &str,
        slot: &str,
        spec: &crate::deployments::DeploymentSpec,
    ) -> Result<(), String> {
        self.agent(node)
            .ok_or_else(|| format!("worker {node} is gone"))?
            .cast(WorkerInbox::Frame(ToWorker::StartReplica {
                slot: slot.to_string(),
                deployment: spec.name.clone(),
                path: spec.path.clone(),
                dtype: spec.dtype,
            }))
            .map_err(|e| format!("worker {node}: {e}"))
    }

    fn stop(&self, node: &str, slot: &str) {
        if let Some(agent) = self.agent(node) {
            let _ = agent.cast(WorkerInbox::Frame(ToWorker::StopReplica {
                slot: slot.to_string(),
            }));
        }
    }
}

pub struct ClusterHeadArgs {
    /// The model the head serves: told to workers that have none configured.
    pub model_path: std::path::PathBuf,
    /// A worker's replicas serve the deployment they name when the head has it, else the
    /// default one.
    pub deployments: crate::deployments::Deployments,
    pub router: Router,
    pub directory: Directory,
    pub table: ClusterTable,
    pub heartbeat_timeout: Duration,
}

pub use super::head_msg::HeadMsg;

pub struct ClusterHeadState {
    args: ClusterHeadArgs,
    seq: u64,
    /// When each unknown node was last asked to register again (one ask per few seconds).
    asked: HashMap<String, Instant>,
    /// Which session speaks for which node.
    sessions: Sessions,
    /// When a frame with a bad key was last logged (one line per few seconds).
    last_refusal: Option<Instant>,
}

pub struct ClusterHead;

impl Actor for ClusterHead {
    type Msg = HeadMsg;
    type State = ClusterHeadState;
    type Arguments = ClusterHeadArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HeadMsg>,
        args: ClusterHeadArgs,
    ) -> Result<ClusterHeadState, ActorProcessingErr> {
        myself.send_interval(Duration::from_secs(1), || HeadMsg::Tick);
        Ok(ClusterHeadState {
            args,
            seq: 0,
            asked: HashMap::new(),
            sessions: Sessions::default(),
            last_refusal: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<HeadMsg>,
        msg: HeadMsg,
        state: &mut ClusterHeadState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HeadMsg::Peer(frame) => state.peer(frame),
            HeadMsg::Tick => state.tick(),
            HeadMsg::SessionUp { id, peer } => state.sessions.up(id, peer),
            HeadMsg::SessionClosed {
                id,
                label,
                authenticated,
            } => {
                if !authenticated {
                    tracing::error!(%label, "a node disconnected before authenticating: its cluster.cookie differs from the head's (or, with TLS, its certificate is not trusted)");
                } else if let Some(node) = state.sessions.closed(id) {
                    let known = state
                        .args
                        .table
                        .inner
                        .lock()
                        .expect("cluster")
                        .workers
                        .contains_key(&node);
                    if known {
                        state.evict(&node, "its connection closed", false);
                    }
                }
            }
        }
        Ok(())
    }
}

impl ClusterHeadState {
    /// A frame from a worker: `Hello` gets the node's session key sent to its agent on its own
    /// session; anything else must carry that key, and then acts for that node only.
    fn peer(&mut self, HeadFrame { node, key, msg }: HeadFrame) {
        if let ToHead::Hello = msg {
            if let Some((agent, key)) = self.sessions.hello(&node) {
                let _ = agent.cast(WorkerInbox::Frame(ToWorker::Welcome { key }));
            }
            return;
        }
        if !self.sessions.check(&node, &key) {
            if self
                .last_refusal
                .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
            {
                self.last_refusal = Some(Instant::now());
                tracing::warn!(%node, "cluster: a frame without this node's session key was dropped (a peer speaking for another node?)");
            }
            return;
        }
        match msg {
            ToHead::Hello => {}
            ToHead::Register(info) => {
                if info.node == node {
                    self.register(*info);
                } else {
                    tracing::warn!(%node, claimed = %info.node, "cluster: a registration for another node was dropped");
                }
            }
            ToHead::Pong { .. } => {
                let known = {
                    let mut t = self.args.table.inner.lock().expect("cluster");
                    match t.workers.get_mut(&node) {
                        Some(w) => {
                            w.last_seen = Instant::now();
                            w.last_heartbeat = now_s();
                            true
                        }
                        None => false,
                    }
                };
                let recently = self
                    .asked
                    .get(&node)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(3));
                if !known && !recently {
                    self.asked.insert(node.clone(), Instant::now());
                    // A worker we evicted (or from before a head restart): have it register again.
                    if let Some(agent) = self.sessions.agent(&node) {
                        let _ = agent.cast(WorkerInbox::Frame(ToWorker::Reregister));
                    }
                }
            }
            ToHead::Stream { request_id, event } => {
                let last = matches!(event, StreamEvent::Finished { .. } | StreamEvent::Error(_));
                let mut t = self.args.table.inner.lock().expect("cluster");
                // Only the node serving the stream may feed it.
                let (ours, overran) = match t.streams.get(&request_id) {
                    Some((n, tx)) if *n == node => match tx.try_send(event) {
                        Err(mpsc::error::TrySendError::Full(_)) => (true, true),
                        _ => (true, false),
                    },
                    _ => (false, false),
                };
                if overran {
                    // More events than the credit allows: the stream ends here (its client gets
                    // an error when the channel closes) and the worker is told to stop it.
                    tracing::warn!(%node, %request_id, "cluster: a worker sent past its stream credit; the stream is cut");
                    t.streams.remove(&request_id);
                    drop(t);
                    if let Some(agent) = self.sessions.agent(&node) {
                        let _ = agent.cast(WorkerInbox::Frame(ToWorker::Cancel { request_id }));
                    }
                } else if ours && last {
                    t.streams.remove(&request_id);
                }
            }
            ToHead::JobProgress {
                trainer,
                job_id,
                attempt,
                point,
            } => {
                // The job manager takes reports only from the trainer running the job.
                if let Some(m) = self.args.directory.job_manager() {
                    let _ = m.cast(JobMsg::Progress {
                        job_id,
                        trainer: format!("{node}/{trainer}"),
                        attempt,
                        point,
                    });
                }
            }
            ToHead::JobFinished {
                trainer,
                job_id,
                attempt,
                result,
            } => {
                let key = format!("{node}/{trainer}");
                {
                    let mut t = self.args.table.inner.lock().expect("cluster");
                    if let Some(current) = t.trainer_jobs.get_mut(&key) {
                        if current
                            .as_ref()
                            .is_some_and(|(id, a)| *id == job_id && *a == attempt)
                        {
                            *current = None;
                        }
                    }
                }
                if let Some(m) = self.args.directory.job_manager() {
                    let _ = m.cast(JobMsg::Finished {
                        job_id,
                        trainer: key,
                        attempt,
                        result,
                    });
                }
            }
            ToHead::Leaving => self.evict(&node, "left the cluster", false),
            ToHead::ReplicaRefused {
                slot,
                deployment,
                why,
            } => {
                tracing::warn!(%node, replica = %slot, %deployment, %why, "a worker refused a replica");
                if let Some(manager) = self.args.deployments.manager() {
                    let _ = manager.cast(crate::deployments::DeploymentMsg::Refused {
                        replica: format!("{node}/{slot}"),
                        deployment,
                        why,
                    });
                }
            }
            ToHead::Replicas { replicas } => {
                let agent = {
                    let mut t = self.args.table.inner.lock().expect("cluster");
                    let Some(w) = t.workers.get_mut(&node) else {
                        return;
                    };
                    w.info.replicas = replicas.clone();
                    w.agent.clone()
                };
                self.sync_replicas(&node, &agent, &replicas);
            }
            ToHead::WhichModel => {
                if let Some(agent) = self.sessions.agent(&node) {
                    tracing::info!(%node, model = %self.args.model_path.display(), "worker asked which model to load");
                    let _ = agent.cast(WorkerInbox::Frame(ToWorker::UseModel {
                        path: self.args.model_path.clone(),
                    }));
                }
            }
        }
    }

    fn tick(&mut self) {
        self.seq += 1;
        let timeout = self.args.heartbeat_timeout;
        let (late, live): (Vec<String>, Vec<ActorRef<WorkerInbox>>) = {
            let t = self.args.table.inner.lock().expect("cluster");
            let late = t
                .workers
                .iter()
                .filter(|(_, w)| w.last_seen.elapsed() > timeout)
                .map(|(n, _)| n.clone())
                .collect();
            let live = t.workers.values().map(|w| w.agent.clone()).collect();
            (late, live)
        };
        for node in late {
            self.evict(
                &node,
                &format!("no heartbeat for {} s", timeout.as_secs_f64()),
                true,
            );
        }
        for agent in live {
            let _ = agent.cast(WorkerInbox::Frame(ToWorker::Ping { seq: self.seq }));
        }
    }

    /// Makes the router's replicas of `node` those of `replicas` that serve and that the head
    /// admits ([`admit`]): new ones are added, ones that stopped serving (draining, stopped,
    /// restarting) are removed, the others keep their load.
    fn sync_replicas(
        &mut self,
        node: &str,
        agent: &ActorRef<WorkerInbox>,
        replicas: &[ReplicaInfo],
    ) {
        let args = &self.args;
        let serving: Vec<&ReplicaInfo> = replicas
            .iter()
            .filter(|r| r.state == ActorState::Running)
            .collect();
        let known: Vec<String> = args
            .router
            .replicas()
            .into_iter()
            .filter(|r| r.node == node)
            .map(|r| r.name)
            .collect();
        for name in &known {
            if !serving
                .iter()
                .any(|r| format!("{node}/{}", r.name) == *name)
            {
                tracing::info!(%node, replica = %name, "a worker's replica stopped serving");
                args.router.remove_replica(name);
            }
        }
        for r in serving {
            let name = format!("{node}/{}", r.name);
            if known.contains(&name) {
                continue;
            }
            let deployment = match admit(node, r, &args.deployments, &args.model_path, &fingerprint)
            {
                Ok(d) => d,
                Err(why) => {
                    tracing::warn!(%node, replica = %name, deployment = %r.deployment, %why, "a worker's replica is not routed");
                    continue;
                }
            };
            tracing::info!(%node, replica = %name, %deployment, "a worker's replica serves");
            args.router.add_remote(
                ReplicaInfo {
                    name,
                    node: node.to_string(),
                    deployment,
                    state: ActorState::Running,
                    in_flight: 0,
                    adapters: Vec::new(),
                    ..r.clone()
                },
                Arc::new(RemoteReplicaHandle {
                    node: node.to_string(),
                    replica: r.name.clone(),
                    agent: agent.clone(),
                    table: args.table.clone(),
                }),
            );
        }
    }

    fn register(&mut self, info: WorkerInfo) {
        let node = info.node.clone();
        let Some(agent) = self.sessions.agent(&node) else {
            tracing::warn!(%node, "registration from a worker whose agent is not visible yet; it will retry");
            return;
        };
        self.args.router.remove_node(&node);
        self.sync_replicas(&node, &agent, &info.replicas);
        let args = &self.args;
        args.directory.remove_node(&node);
        {
            let mut t = args.table.inner.lock().expect("cluster");
            for (trainer, _) in &info.trainers {
                let running = info
                    .running
                    .iter()
                    .find(|(t, _, _)| t == trainer)
                    .map(|(_, j, a)| (j.clone(), *a));
                t.trainer_jobs.insert(format!("{node}/{trainer}"), running);
            }
        }
        for (trainer, device) in &info.trainers {
            args.directory.set_trainer(
                &format!("{node}/{trainer}"),
                Some(TrainerEntry {
                    local: false,
                    actor: Arc::new(RemoteTrainerHandle {
                        node: node.clone(),
                        trainer: trainer.clone(),
                        agent: agent.clone(),
                        table: args.table.clone(),
                    }),
                    node: node.clone(),
                    device: device.clone(),
                    tags: info.tags.clone(),
                }),
            );
        }
        tracing::info!(%node, host = %info.hostname, replicas = info.replicas.len(), trainers = info.trainers.len(), tags = %crate::tags::describe(&info.tags), "worker joined");
        args.table.inner.lock().expect("cluster").workers.insert(
            node,
            Worker {
                info,
                agent,
                last_seen: Instant::now(),
                joined_at: now_s(),
                last_heartbeat: now_s(),
            },
        );
        if let Some(m) = args.directory.job_manager() {
            let _ = m.cast(JobMsg::TrainersChanged);
        }
    }

    /// Drops a worker: its replicas leave the router (their in-flight streams end with an error),
    /// its trainers leave the directory (their jobs go back to the queue).
    fn evict(&mut self, node: &str, why: &str, tell_it: bool) {
        let (worker, streams) = {
            let mut t = self.args.table.inner.lock().expect("cluster");
            let worker = t.workers.remove(node);
            let ids: Vec<String> = t
                .streams
                .iter()
                .filter(|(_, (n, _))| n == node)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                t.streams.remove(id);
            }
            t.trainer_jobs
                .retain(|k, _| !k.starts_with(&format!("{node}/")));
            (worker, ids.len())
        };
        let Some(worker) = worker else {
            return;
        };
        if tell_it {
            tracing::error!(%node, %why, failed_streams = streams, "worker evicted");
            let _ = worker.agent.cast(WorkerInbox::Frame(ToWorker::Evicted));
        } else {
            tracing::warn!(%node, %why, failed_streams = streams, "worker gone");
        }
        self.args.router.remove_node(node);
        if self.args.directory.remove_node(node) {
            if let Some(m) = self.args.directory.job_manager() {
                let _ = m.cast(JobMsg::TrainersChanged);
            }
        }
    }
}

/// How the head's cluster endpoint listens.
#[derive(Clone)]
pub struct HeadClusterOptions {
    /// The model the head serves (told to workers without one).
    pub model_path: std::path::PathBuf,
    /// The head's deployments (what workers' replicas serve).
    pub deployments: crate::deployments::Deployments,
    pub bind: IpAddr,
    /// 0: any free port.
    pub port: u16,
    pub cookie: String,
    pub heartbeat_timeout: Duration,
    /// Accept to authenticated session (TLS and cookie), at most.
    pub handshake_timeout: Duration,
    /// Open cluster connections at most.
    pub max_connections: usize,
    /// Mutual TLS; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// The head's cluster endpoint: our accept loop, the node server behind it, `ClusterHead` and
/// its exported `HeadPort`.
pub struct HeadCluster {
    pub table: ClusterTable,
    pub port: u16,
    pub server: ActorRef<NodeServerMessage>,
    pub actor: ActorRef<HeadMsg>,
    pub head_port: ActorRef<HeadInbox>,
    /// Their supervisor.
    pub watch: ClusterWatch,
}

impl HeadCluster {
    /// Listens on `bind:port` for workers presenting `cookie` (and, with TLS, a certificate
    /// signed by the CA).
    pub async fn start(
        opts: HeadClusterOptions,
        router: Router,
        directory: Directory,
        health: HealthBoard,
    ) -> Result<Self, String> {
        let HeadClusterOptions {
            model_path,
            deployments,
            bind,
            port,
            cookie,
            heartbeat_timeout,
            handshake_timeout,
            max_connections,
            tls,
        } = opts;
        let acceptor = tls.as_ref().map(TlsFiles::acceptor).transpose()?;
        // Fail now, with the key's name; port 0 picks a free one, told in `/cluster` and the logs.
        let listener = std::net::TcpListener::bind((bind, port))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| format!("cluster.port: cannot listen on {bind}:{port}: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("cluster.port: {e}"))?
            .port();
        // The node server's own listener is on loopback (an ephemeral port, told to nobody), and
        // sessions that come through it are stopped: every peer enters through the gate.
        let server = NodeServer::new(
            0,
            cookie,
            "head".into(),
            bind.to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| format!("cluster node server: {e}"))?;
        let table = ClusterTable::default();
        deployments.set_remote(Arc::new(WorkerSlots {
            table: table.clone(),
        }));
        let (actor, _) = Actor::spawn(
            None,
            ClusterHead,
            ClusterHeadArgs {
                model_path,
                deployments: deployments.clone(),
                router,
                directory,
                table: table.clone(),
                heartbeat_timeout,
            },
        )
        .await
        .map_err(|e| format!("cluster head actor: {e}"))?;
        let (head_port, _) = Actor::spawn(None, HeadPort, actor.clone())
            .await
            .map_err(|e| format!("cluster head port: {e}"))?;
        // Escalations show on the health board (`/health` answers 503); the head keeps serving
        // what it can until its process manager restarts it.
        let (watch, _escalations) = ClusterWatch::start(health).await?;
        watch.adopt("cluster-node-server", server.get_cell());
        watch.adopt("cluster-head", actor.get_cell());
        watch.adopt("cluster-head-port", head_port.get_cell());
        let conns = Conns::default();
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "tessera-head".into(),
                subscription: Box::new(SessionEvents::new(actor.clone(), conns.clone())),
            })
            .map_err(|e| e.to_string())?;
        gate::spawn(
            listener,
            server.clone(),
            GateConfig {
                max_connections,
                handshake_timeout,
                tls: acceptor,
            },
            conns,
        );
        tracing::info!(%bind, port, tls = tls.is_some(), max_connections, "cluster: listening for workers");
        Ok(Self {
            table,
            port,
            server,
            actor,
            head_port,
            watch,
        })
    }
}

/// The fingerprint of the model at `path` (taken anew at each use: the file may have changed).
fn fingerprint(path: &Path) -> Option<String> {
    tessera_engine::fingerprint::of(path)
        .map_err(
            |e| tracing::warn!(error = %e, path = %path.display(), "cannot fingerprint a model"),
        )
        .ok()
}

/// The deployment a worker's serving replica `r` may take requests for, or why none. A replica
/// labelled with a deployment made at runtime serves it where the head placed it, or (one started
/// for this head before it restarted) when it holds that deployment's model; any other replica of
/// the worker (its own, started with the node, labelled with its own model's name) serves the
/// default deployment only when it holds the head's model (`default_model`). Models are compared
/// by `fingerprint`.
fn admit(
    node: &str,
    r: &ReplicaInfo,
    deployments: &crate::deployments::Deployments,
    default_model: &Path,
    fingerprint: &dyn Fn(&Path) -> Option<String>,
) -> Result<String, String> {
    let same = |path: &Path, what: &str| match (r.fingerprint.as_deref(), fingerprint(path)) {
        (Some(theirs), Some(ours)) if theirs == ours => Ok(()),
        (Some(theirs), Some(ours)) => Err(format!(
            "it serves {} (fingerprint {theirs}), not {what} (fingerprint {ours})",
            r.model.as_deref().unwrap_or("another model"),
        )),
        (None, _) => Err("it reports no fingerprint of its model".to_string()),
        (_, None) => Err(format!("the head cannot fingerprint {what}")),
    };
    if let Some(d) = deployments.get(&r.deployment).filter(|d| !d.default) {
        let name = format!("{node}/{}", r.name);
        if d.replicas.contains(&name) {
            return Ok(d.name);
        }
        return same(
            &d.spec.path,
            &format!("the model of deployment `{}`", d.name),
        )
        .map(|()| d.name.clone())
        .map_err(|e| format!("this head did not place it, and {e}"));
    }
    same(default_model, "the default deployment's model")
        .map(|()| deployments.default_name())
        .map_err(|e| {
            format!("{e}; give the worker the head's model (or no model.path, to load the head's)")
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::admit;
    use crate::deployments::Deployments;
    use crate::health::ActorState;
    use crate::messages::ReplicaInfo;

    fn reported(deployment: &str, fingerprint: Option<&str>) -> ReplicaInfo {
        ReplicaInfo {
            name: "inference-0".into(),
            node: "w".into(),
            devices: vec![],
            tensor_parallel: 1,
            state: ActorState::Running,
            in_flight: 0,
            adapters: vec![],
            model: Some("other".into()),
            dtype: None,
            weights: None,
            deployment: deployment.into(),
            fingerprint: fingerprint.map(str::to_string),
        }
    }

    #[test]
    fn a_workers_own_replica_serves_the_default_only_with_the_heads_model() {
        let d = Deployments::new("model");
        let head_model = Path::new("/models/head");
        let known = |p: &Path| (p == head_model).then(|| "ab".to_string());
        let unknown = |_: &Path| None;
        // Its own label (its model's name) or the default's: the fingerprint decides.
        for label in ["model", "its-own-model", ""] {
            let admitted = admit("w", &reported(label, Some("ab")), &d, head_model, &known);
            assert_eq!(admitted, Ok("model".into()));
            let e = admit("w", &reported(label, Some("cd")), &d, head_model, &known).unwrap_err();
            assert!(e.contains("not the default deployment's model"), "{e}");
            assert!(admit("w", &reported(label, None), &d, head_model, &known).is_err());
            assert!(admit("w", &reported(label, Some("ab")), &d, head_model, &unknown).is_err());
        }
    }

    #[test]
    fn a_replica_of_a_runtime_deployment_serves_where_placed_or_with_its_model() {
        let d = Deployments::new("model");
        let view = serde_json::json!({
            "name": "pool",
            "spec": {"name": "pool", "path": "/models/pool", "replicas": 1, "min_replicas": 1,
                     "max_replicas": 1},
            "state": "ready", "reason": null, "default": false, "replicas": ["w/inference-1"],
            "target_replicas": 1, "model": null, "autoscaler": null, "created_at": 0.0
        });
        d.publish(vec![serde_json::from_value(view).unwrap()]);
        let pool = |p: &Path| (p == Path::new("/models/pool")).then(|| "ef".to_string());
        let head_model = Path::new("/models/head");
        let mut placed = reported("pool", Some("00"));
        placed.name = "inference-1".into();
        assert_eq!(
            admit("w", &placed, &d, head_model, &pool),
            Ok("pool".into())
        );
        // Not placed by this head (started for it before a restart): its model decides.
        let other_slot = reported("pool", Some("ef"));
        assert_eq!(
            admit("w", &other_slot, &d, head_model, &pool),
            Ok("pool".into())
        );
        let e = admit("w", &reported("pool", Some("00")), &d, head_model, &pool).unwrap_err();
        assert!(e.contains("did not place it"), "{e}");
    }
}
