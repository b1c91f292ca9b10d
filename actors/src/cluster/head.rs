//! The head's side of the cluster: a `ractor_cluster` node server (star topology: workers dial in,
//! cookie-authenticated), and the `ClusterHead` actor that registers workers, puts their replicas in
//! the router and their trainers in the directory, carries token streams and job reports back,
//! pings every worker each second and evicts one that misses `heartbeat_timeout` (a crashed worker
//! is seen at once from its closed session; a hung or stopped one by the heartbeat).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use serde::Serialize;
use tokio::sync::mpsc;

use super::wire::{
    worker_group, HeadInbox, ToHead, ToWorker, WorkerInbox, WorkerInfo, CREDIT_BATCH, HEAD_GROUP,
};
use crate::directory::{Directory, RemoteTrainer, TrainerEntry, TrainerRef};
use crate::health::now_s;
use crate::jobs::{Assignment, JobMsg};
use crate::messages::{ChatWork, ReplicaInfo, ServeError, StreamEvent};
use crate::router::{RemoteReplica, Router};

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
    streams: HashMap<String, (String, mpsc::UnboundedSender<StreamEvent>)>,
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
    agent: ActorRef<WorkerInbox>,
    table: ClusterTable,
}

impl RemoteReplica for RemoteReplicaHandle {
    fn generate(&self, work: ChatWork, sink: mpsc::Sender<StreamEvent>) -> Result<(), ServeError> {
        let request_id = work.request_id.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<StreamEvent>();
        self.table
            .inner
            .lock()
            .expect("cluster")
            .streams
            .insert(request_id.clone(), (self.node.clone(), tx));
        if let Err(e) = self.agent.cast(WorkerInbox(ToWorker::Generate { work })) {
            self.table
                .inner
                .lock()
                .expect("cluster")
                .streams
                .remove(&request_id);
            return Err(ServeError::unavailable(format!("node {}: {e}", self.node)));
        }
        // Events arrive from the worker into `tx`; this task hands them to the client's bounded
        // channel and tells the worker to stop when the client is gone.
        let agent = self.agent.clone();
        let table = self.table.clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut delivered = 0;
            while let Some(mut event) = rx.recv().await {
                if let StreamEvent::Started { replica, .. } = &mut event {
                    *replica = format!("{node}/{replica}");
                }
                if sink.send(event).await.is_err() {
                    let _ = agent.cast(WorkerInbox(ToWorker::Cancel {
                        request_id: request_id.clone(),
                    }));
                    break;
                }
                // Credit flows back only as the client takes events: a slow client holds the
                // worker to STREAM_WINDOW events in flight.
                delivered += 1;
                if delivered == CREDIT_BATCH {
                    delivered = 0;
                    let _ = agent.cast(WorkerInbox(ToWorker::Credit {
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

impl RemoteTrainer for RemoteTrainerHandle {
    fn run(&self, assignment: Assignment) -> Result<(), String> {
        let job = (assignment.job_id.clone(), assignment.attempt);
        self.agent
            .cast(WorkerInbox(ToWorker::RunJob {
                trainer: self.trainer.clone(),
                assignment: Box::new(assignment),
            }))
            .map_err(|e| format!("node {}: {e}", self.node))?;
        self.table
            .inner
            .lock()
            .expect("cluster")
            .trainer_jobs
            .insert(self.key(), Some(job));
        Ok(())
    }

    fn cancel(&self, job_id: &str, checkpoint: bool) {
        let _ = self.agent.cast(WorkerInbox(ToWorker::CancelJob {
            trainer: self.trainer.clone(),
            job_id: job_id.to_string(),
            checkpoint,
            stale_attempt: None,
        }));
    }

    fn fence(&self, job_id: &str, attempt: u32) {
        let _ = self.agent.cast(WorkerInbox(ToWorker::CancelJob {
            trainer: self.trainer.clone(),
            job_id: job_id.to_string(),
            checkpoint: false,
            stale_attempt: Some(attempt),
        }));
    }

    fn current(&self) -> Option<(String, u32)> {
        self.table
            .inner
            .lock()
            .expect("cluster")
            .trainer_jobs
            .get(&self.key())
            .cloned()
            .flatten()
    }
}

pub struct ClusterHeadArgs {
    /// The model the head serves: told to workers that have none configured.
    pub model_path: std::path::PathBuf,
    pub router: Router,
    pub directory: Directory,
    pub table: ClusterTable,
    pub heartbeat_timeout: Duration,
}

pub struct ClusterHeadState {
    args: ClusterHeadArgs,
    seq: u64,
    /// When each unknown node was last asked to register again (one ask per few seconds).
    asked: HashMap<String, Instant>,
}

pub struct ClusterHead;

impl Actor for ClusterHead {
    type Msg = HeadInbox;
    type State = ClusterHeadState;
    type Arguments = ClusterHeadArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HeadInbox>,
        args: ClusterHeadArgs,
    ) -> Result<ClusterHeadState, ActorProcessingErr> {
        ractor::pg::join(HEAD_GROUP.to_string(), vec![myself.get_cell()]);
        myself.send_interval(Duration::from_secs(1), || HeadInbox(ToHead::Tick));
        Ok(ClusterHeadState {
            args,
            seq: 0,
            asked: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<HeadInbox>,
        HeadInbox(msg): HeadInbox,
        state: &mut ClusterHeadState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ToHead::Register(info) => state.register(*info),
            ToHead::Pong { node, .. } => {
                let known = {
                    let mut t = state.args.table.inner.lock().expect("cluster");
                    match t.workers.get_mut(&node) {
                        Some(w) => {
                            w.last_seen = Instant::now();
                            w.last_heartbeat = now_s();
                            true
                        }
                        None => false,
                    }
                };
                let recently = state
                    .asked
                    .get(&node)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(3));
                if !known && !recently {
                    state.asked.insert(node.clone(), Instant::now());
                    // A worker we evicted (or from before a head restart): have it register again.
                    if let Some(agent) = agent_of(&node) {
                        let _ = agent.cast(WorkerInbox(ToWorker::Reregister));
                    }
                }
            }
            ToHead::Stream { request_id, event } => {
                let last = matches!(event, StreamEvent::Finished { .. } | StreamEvent::Error(_));
                let mut t = state.args.table.inner.lock().expect("cluster");
                if let Some((_, tx)) = t.streams.get(&request_id) {
                    let _ = tx.send(event);
                }
                if last {
                    t.streams.remove(&request_id);
                }
            }
            ToHead::JobProgress {
                node,
                trainer,
                job_id,
                attempt,
                point,
            } => {
                if let Some(m) = state.args.directory.job_manager() {
                    let _ = m.cast(JobMsg::Progress {
                        job_id,
                        trainer: format!("{node}/{trainer}"),
                        attempt,
                        point,
                    });
                }
            }
            ToHead::JobFinished {
                node,
                trainer,
                job_id,
                attempt,
                result,
            } => {
                let key = format!("{node}/{trainer}");
                state
                    .args
                    .table
                    .inner
                    .lock()
                    .expect("cluster")
                    .trainer_jobs
                    .insert(key.clone(), None);
                if let Some(m) = state.args.directory.job_manager() {
                    let _ = m.cast(JobMsg::Finished {
                        job_id,
                        trainer: key,
                        attempt,
                        result,
                    });
                }
            }
            ToHead::Leaving { node } => state.evict(&node, "left the cluster", false),
            ToHead::WhichModel { node } => {
                if let Some(agent) = agent_of(&node) {
                    tracing::info!(%node, model = %state.args.model_path.display(), "worker asked which model to load");
                    let _ = agent.cast(WorkerInbox(ToWorker::UseModel {
                        path: state.args.model_path.clone(),
                    }));
                }
            }
            ToHead::Tick => {
                state.seq += 1;
                let timeout = state.args.heartbeat_timeout;
                let (late, live): (Vec<String>, Vec<ActorRef<WorkerInbox>>) = {
                    let t = state.args.table.inner.lock().expect("cluster");
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
                    state.evict(
                        &node,
                        &format!("no heartbeat for {} s", timeout.as_secs_f64()),
                        true,
                    );
                }
                for agent in live {
                    let _ = agent.cast(WorkerInbox(ToWorker::Ping { seq: state.seq }));
                }
            }
            ToHead::SessionClosed {
                peer,
                address,
                authenticated,
            } => {
                if !authenticated {
                    tracing::error!(%address, "a node disconnected before authenticating: its cluster.cookie differs from the head's");
                } else if state
                    .args
                    .table
                    .inner
                    .lock()
                    .expect("cluster")
                    .workers
                    .contains_key(&peer)
                {
                    state.evict(&peer, "its connection closed", false);
                }
            }
        }
        Ok(())
    }
}

fn agent_of(node: &str) -> Option<ActorRef<WorkerInbox>> {
    ractor::pg::get_members(&worker_group(node))
        .into_iter()
        .next()
        .map(ActorRef::from)
}

impl ClusterHeadState {
    fn register(&mut self, info: WorkerInfo) {
        let node = info.node.clone();
        let Some(agent) = agent_of(&node) else {
            tracing::warn!(%node, "registration from a worker whose agent is not visible yet; it will retry");
            return;
        };
        let args = &self.args;
        args.router.remove_node(&node);
        for r in &info.replicas {
            args.router.add_remote(
                ReplicaInfo {
                    name: format!("{node}/{}", r.name),
                    node: node.clone(),
                    state: "running".into(),
                    in_flight: 0,
                    adapters: Vec::new(),
                    ..r.clone()
                },
                Arc::new(RemoteReplicaHandle {
                    node: node.clone(),
                    agent: agent.clone(),
                    table: args.table.clone(),
                }),
            );
        }
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
                    actor: TrainerRef::Remote(Arc::new(RemoteTrainerHandle {
                        node: node.clone(),
                        trainer: trainer.clone(),
                        agent: agent.clone(),
                        table: args.table.clone(),
                    })),
                    node: node.clone(),
                    device: device.clone(),
                }),
            );
        }
        tracing::info!(%node, host = %info.hostname, replicas = info.replicas.len(), trainers = info.trainers.len(), "worker joined");
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
            let _ = worker.agent.cast(WorkerInbox(ToWorker::Evicted));
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

/// Forwards session events of the node server to the `ClusterHead` actor.
struct SessionEvents {
    head: ActorRef<HeadInbox>,
    authenticated: Arc<Mutex<std::collections::HashSet<String>>>,
}

fn peer_of(ses: &NodeServerSessionInformation) -> String {
    ses.peer_name
        .as_ref()
        .map(|n| n.name.split('@').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.authenticated
            .lock()
            .expect("sessions")
            .insert(ses.peer_addr.clone());
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let authenticated = self
            .authenticated
            .lock()
            .expect("sessions")
            .remove(&ses.peer_addr);
        let _ = self.head.cast(HeadInbox(ToHead::SessionClosed {
            peer: peer_of(&ses),
            address: ses.peer_addr.clone(),
            authenticated,
        }));
    }
}

/// The head's cluster endpoint: node server + `ClusterHead`.
pub struct HeadCluster {
    pub table: ClusterTable,
    pub port: u16,
    pub server: ActorRef<NodeServerMessage>,
    pub actor: ActorRef<HeadInbox>,
}

impl HeadCluster {
    /// Listens on `bind:port` (0: any free port) for workers presenting `cookie`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        model_path: std::path::PathBuf,
        bind: std::net::IpAddr,
        port: u16,
        cookie: &str,
        router: Router,
        directory: Directory,
        heartbeat_timeout: Duration,
    ) -> Result<Self, String> {
        // Pick the port ourselves so `/cluster` and the logs can tell it (port 0 = any free one).
        let port = if port == 0 {
            std::net::TcpListener::bind((bind, 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cluster.port: {e}"))?
                .port()
        } else {
            // Fail now, with the key's name, rather than inside the listener actor.
            std::net::TcpListener::bind((bind, port))
                .map_err(|e| format!("cluster.port: cannot listen on {bind}:{port}: {e}"))?;
            port
        };
        let server = NodeServer::new(
            port,
            cookie.to_string(),
            "head".into(),
            bind.to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(bind);
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| format!("cluster node server: {e}"))?;
        let table = ClusterTable::default();
        let (actor, _) = Actor::spawn(
            None,
            ClusterHead,
            ClusterHeadArgs {
                model_path,
                router,
                directory,
                table: table.clone(),
                heartbeat_timeout,
            },
        )
        .await
        .map_err(|e| format!("cluster head actor: {e}"))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "tessera-head".into(),
                subscription: Box::new(SessionEvents {
                    head: actor.clone(),
                    authenticated: Arc::default(),
                }),
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(%bind, port, "cluster: listening for workers");
        Ok(Self {
            table,
            port,
            server,
            actor,
        })
    }
}
