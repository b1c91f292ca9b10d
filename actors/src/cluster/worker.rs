//! The worker's side of the cluster: its own node (replicas and trainers, no job manager), a
//! `WorkerAgent` actor the head reaches through pg, and the dial loop: connect to the head, keep
//! the backoff across sessions until a session is authenticated, register, redial when the
//! session drops; a session that closes before authenticating means a wrong cookie and stops the
//! worker with a configuration error instead of a reconnect storm.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::confine::WorkerRoots;
use super::supervision::ClusterWatch;
use super::tls::{self, TlsFiles};
use super::wire::{
    worker_group, HeadFrame, HeadInbox, ToHead, ToWorker, WorkerInbox, WorkerInfo, HEAD_GROUP,
    STREAM_WINDOW,
};
use crate::health::{ActorState, HealthBoard};
use crate::jobs::JobMsg;
use crate::messages::StreamEvent;
use crate::node::Node;

fn head() -> Option<ActorRef<HeadInbox>> {
    ractor::pg::get_members(&HEAD_GROUP.to_string())
        .into_iter()
        .next()
        .map(ActorRef::from)
}

/// This worker's way to the head: its node name and the key the head gave its current session.
#[derive(Clone)]
pub struct HeadLink {
    name: String,
    key: Arc<Mutex<Option<String>>>,
    welcomed: Arc<tokio::sync::Notify>,
    /// Set once the worker is leaving: it takes no new job.
    leaving: Arc<std::sync::atomic::AtomicBool>,
}

impl HeadLink {
    fn new(name: String) -> Self {
        Self {
            name,
            key: Arc::default(),
            welcomed: Arc::default(),
            leaving: Arc::default(),
        }
    }

    fn leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn frame(&self, msg: ToHead, key: String) -> bool {
        match head() {
            Some(h) => h
                .cast(HeadInbox::Frame(HeadFrame {
                    node: self.name.clone(),
                    key,
                    msg,
                }))
                .is_ok(),
            None => false,
        }
    }

    /// Sends `msg` signed with the session key; false without a session key or head.
    fn send(&self, msg: ToHead) -> bool {
        let key = self.key.lock().expect("key").clone();
        match key {
            Some(key) => self.frame(msg, key),
            None => false,
        }
    }

    fn welcome(&self, key: String) {
        *self.key.lock().expect("key") = Some(key);
        self.welcomed.notify_waiters();
    }

    fn forget(&self) {
        *self.key.lock().expect("key") = None;
    }

    /// Asks the head for this session's key (again every half second) until it arrives.
    async fn hello(&self, timeout: Duration) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < timeout {
            let welcomed = self.welcomed.notified();
            if self.key.lock().expect("key").is_some() {
                return true;
            }
            self.frame(ToHead::Hello, String::new());
            let _ = tokio::time::timeout(Duration::from_millis(500), welcomed).await;
        }
        self.key.lock().expect("key").is_some()
    }
}

pub struct WorkerAgentArgs {
    /// This worker's unique node name.
    pub name: String,
    /// Set once the node has started (a worker without a model asks the head first).
    pub node: Arc<std::sync::OnceLock<Arc<Node>>>,
    pub hostname: String,
    /// Where the head's answer to `WhichModel` goes.
    pub model_reply: Arc<Mutex<Option<tokio::sync::oneshot::Sender<std::path::PathBuf>>>>,
    pub link: HeadLink,
    /// Every path from the head must lie inside these.
    pub roots: WorkerRoots,
}

pub struct WorkerAgentState {
    args: WorkerAgentArgs,
    /// The replicas (name, state, deployment) last reported to the head.
    reported: Vec<(String, crate::health::ActorState, String)>,
    /// Per stream: its task, and the credit the head has granted.
    streams: HashMap<String, (tokio::task::AbortHandle, Arc<tokio::sync::Semaphore>)>,
    finished: mpsc::UnboundedSender<String>,
}

pub struct WorkerAgent;

impl WorkerAgent {
    /// What the head needs to know of this worker.
    pub async fn info(node: &Node, hostname: &str) -> WorkerInfo {
        let mut running = Vec::new();
        for (name, entry) in node.directory.trainers() {
            if let Some((job, attempt)) = entry.current().await {
                running.push((name, job, attempt));
            }
        }
        WorkerInfo {
            node: node.name.clone(),
            hostname: hostname.to_string(),
            inventory: node.inventory.clone(),
            placement: node.placement.clone(),
            replicas: node.router.replicas(),
            trainers: node
                .placement
                .trainers
                .iter()
                .map(|t| (t.name.clone(), t.device.to_string()))
                .collect(),
            running,
            tags: node.tags.clone(),
            resources: Some(node.resources.clone()),
        }
    }
}

impl Actor for WorkerAgent {
    type Msg = WorkerInbox;
    type State = WorkerAgentState;
    type Arguments = WorkerAgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerInbox>,
        args: WorkerAgentArgs,
    ) -> Result<WorkerAgentState, ActorProcessingErr> {
        ractor::pg::join(worker_group(&args.name), vec![myself.get_cell()]);
        let (finished, mut done) = mpsc::unbounded_channel::<String>();
        let me = myself.clone();
        // Streams that end remove themselves (through a local-only Cancel of a finished id).
        tokio::spawn(async move {
            while let Some(id) = done.recv().await {
                if me
                    .cast(WorkerInbox::Frame(ToWorker::Cancel { request_id: id }))
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(WorkerAgentState {
            args,
            reported: Vec::new(),
            streams: HashMap::new(),
            finished,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WorkerInbox>,
        msg: WorkerInbox,
        state: &mut WorkerAgentState,
    ) -> Result<(), ActorProcessingErr> {
        let msg = match msg {
            WorkerInbox::Frame(m) => m,
            WorkerInbox::Undecodable(why) => {
                tracing::warn!(%why, "cluster: an undecodable frame from the head was dropped");
                return Ok(());
            }
        };
        let msg = match msg {
            ToWorker::UseModel { path } => {
                if let Some(reply) = state.args.model_reply.lock().expect("model reply").take() {
                    let _ = reply.send(path);
                }
                return Ok(());
            }
            ToWorker::Welcome { key } => {
                state.args.link.welcome(key);
                return Ok(());
            }
            other => other,
        };
        let link = state.args.link.clone();
        let Some(node) = state.args.node.get().cloned() else {
            // Not started yet: it registers (and only then gets work) once it has.
            return Ok(());
        };
        match msg {
            ToWorker::UseModel { .. } | ToWorker::Welcome { .. } => {}
            ToWorker::Ping { seq } => {
                link.send(ToHead::Pong { seq });
                // Replicas started, loaded, draining or stopped since: tell the head.
                let replicas = node.router.replicas();
                let now: Vec<_> = replicas
                    .iter()
                    .map(|r| (r.name.clone(), r.state, r.deployment.clone()))
                    .collect();
                if now != state.reported && link.send(ToHead::Replicas { replicas }) {
                    state.reported = now;
                }
            }
            ToWorker::StartReplica {
                slot,
                deployment,
                path,
                dtype,
            } => {
                let refused = if let Err(e) = state.args.roots.model(&path) {
                    tracing::warn!(replica = %slot, %deployment, error = %e, "the head asked for a replica of a model outside this worker's roots; refused");
                    Some(e.to_string())
                } else if let Err(e) = node.start_replica(&slot, &deployment, path, dtype.kind()) {
                    tracing::warn!(replica = %slot, %deployment, error = %e, "the head asked for a replica that cannot start here");
                    Some(e)
                } else {
                    None
                };
                if let Some(why) = refused {
                    link.send(ToHead::ReplicaRefused {
                        slot,
                        deployment,
                        why,
                    });
                }
            }
            ToWorker::StopReplica { slot } => {
                tokio::spawn(async move { node.stop_replica(&slot).await });
            }
            ToWorker::Generate { work, replica } => {
                let request_id = work.request_id.clone();
                if let Some(Err(e)) = work.adapter.as_deref().map(|a| state.args.roots.adapter(a)) {
                    tracing::warn!(request_id = %request_id, error = %e, "a request with an adapter outside this worker's roots; refused");
                    link.send(ToHead::Stream {
                        request_id,
                        event: StreamEvent::Error(crate::messages::ServeError::invalid(
                            "adapter_path",
                            e,
                        )),
                    });
                    return Ok(());
                }
                let span = tracing::info_span!("request", request_id = %work.trace_id);
                let finished = state.finished.clone();
                let id = request_id.clone();
                let credit = Arc::new(tokio::sync::Semaphore::new(STREAM_WINDOW as usize));
                let window = credit.clone();
                let task = tokio::spawn(
                    async move {
                        let dispatched = match &replica {
                            Some(name) => node.router.dispatch_named(name, *work),
                            None => node.router.dispatch(None, *work),
                        };
                        match dispatched {
                            Err(e) => {
                                link.send(ToHead::Stream {
                                    request_id: id.clone(),
                                    event: StreamEvent::Error(e),
                                });
                            }
                            Ok(mut d) => loop {
                                let Some(event) = d.events.recv().await else {
                                    // The replica's stream ended with no end event (its engine
                                    // stopped): the head hears it now and may move the request.
                                    link.send(ToHead::Stream {
                                        request_id: id.clone(),
                                        event: StreamEvent::Error(
                                            crate::messages::ServeError::unavailable(format!(
                                                "replica {} stopped while serving this request",
                                                d.lease.replica
                                            )),
                                        ),
                                    });
                                    break;
                                };
                                // Wait for credit: the head has not delivered enough yet.
                                match window.acquire().await {
                                    Ok(permit) => permit.forget(),
                                    Err(_) => break,
                                }
                                let last = matches!(
                                    event,
                                    StreamEvent::Finished { .. } | StreamEvent::Error(_)
                                );
                                if !link.send(ToHead::Stream {
                                    request_id: id.clone(),
                                    event,
                                }) || last
                                {
                                    break;
                                }
                            },
                        }
                        let _ = finished.send(id);
                    }
                    .instrument(span),
                );
                state
                    .streams
                    .insert(request_id, (task.abort_handle(), credit));
            }
            ToWorker::Cancel { request_id } => {
                // Aborting drops the stream's receiver, which cancels the sequence.
                if let Some((task, _)) = state.streams.remove(&request_id) {
                    task.abort();
                }
            }
            ToWorker::Credit { request_id, n } => {
                if let Some((_, credit)) = state.streams.get(&request_id) {
                    credit.add_permits(n as usize);
                }
            }
            ToWorker::RunJob {
                trainer,
                assignment,
            } => {
                let confined = confine_job(&state.args.roots, &assignment.job);
                match (confined, node.directory.local_trainer(&trainer)) {
                    (Err(error), Some(_)) => {
                        tracing::warn!(job = %assignment.job_id, %error, "a job with paths outside this worker's roots; refused");
                        link.send(ToHead::JobFinished {
                            result: crate::jobs::RunResult::Failed { error },
                            trainer,
                            job_id: assignment.job_id,
                            attempt: assignment.attempt,
                        });
                    }
                    (Ok(()), Some(t)) if !link.leaving() => {
                        let _ = t.run(*assignment);
                    }
                    (_, found) => {
                        let reason = if found.is_some() {
                            format!("node {} is leaving the cluster", node.name)
                        } else {
                            format!("node {} has no trainer {trainer}", node.name)
                        };
                        link.send(ToHead::JobFinished {
                            result: crate::jobs::RunResult::Refused { reason },
                            trainer,
                            job_id: assignment.job_id,
                            attempt: assignment.attempt,
                        });
                    }
                }
            }
            ToWorker::CancelJob {
                trainer,
                job_id,
                checkpoint,
                stale_attempt,
            } => {
                if let Some(t) = node.directory.local_trainer(&trainer) {
                    match stale_attempt {
                        Some(attempt) => t.fence(&job_id, attempt),
                        None => t.cancel(&job_id, checkpoint),
                    }
                }
            }
            ToWorker::Evicted => {
                // Our jobs were given to other trainers: stop them without writing a checkpoint.
                tracing::error!("the head evicted this worker (missed heartbeats); stopping its jobs and registering again");
                for (name, entry) in node.directory.trainers() {
                    if let Some((job, attempt)) = entry.current().await {
                        entry.fence(&job, attempt);
                        tracing::warn!(trainer = %name, %job, "job stopped: it was re-queued on the head");
                    }
                }
                let info = WorkerAgent::info(&node, &state.args.hostname).await;
                link.send(ToHead::Register(Box::new(info)));
            }
            ToWorker::Reregister => {
                let info = WorkerAgent::info(&node, &state.args.hostname).await;
                link.send(ToHead::Register(Box::new(info)));
            }
        }
        Ok(())
    }
}

/// Events of the worker's own (outgoing) sessions, as a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEvent {
    Authenticated { id: u64 },
    Disconnected { id: u64, authenticated: bool },
}

/// The worker dials the head and serves no one: an incoming session (a stranger on its node
/// server's port) is stopped at once and never touches the state of the session to the head.
struct Events {
    tx: mpsc::UnboundedSender<SessionEvent>,
    /// Outgoing sessions that passed the cookie check.
    authenticated: Mutex<std::collections::HashSet<u64>>,
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if ses.is_server {
            tracing::warn!(peer = %ses.peer_addr, "cluster: an incoming connection to a worker was closed (workers only dial their head)");
            ses.actor.stop(Some("workers accept no sessions".into()));
        }
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if ses.is_server {
            return;
        }
        self.authenticated
            .lock()
            .expect("events")
            .insert(ses.node_id);
        let _ = self
            .tx
            .send(SessionEvent::Authenticated { id: ses.node_id });
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if ses.is_server {
            return;
        }
        let authenticated = self
            .authenticated
            .lock()
            .expect("events")
            .remove(&ses.node_id);
        let _ = self.tx.send(SessionEvent::Disconnected {
            id: ses.node_id,
            authenticated,
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the head at {0} refused this worker (it closed the session before authentication): set the same cluster.cookie on both, and with TLS a cluster.tls_cert signed by the head's cluster.tls_ca")]
    Cookie(String),
    #[error("{0}: check cluster.tls_cert, cluster.tls_key and cluster.tls_ca (the head's certificate must be signed by cluster.tls_ca and valid for the host in --join)")]
    Tls(String),
    #[error("{0}")]
    Start(String),
    /// A cluster actor failed (see [`super::supervision`]): the worker stops so that its service
    /// manager restarts it whole.
    #[error("cluster actor {0} failed; this worker stops so that it can be restarted whole")]
    Escalated(String),
}

/// How waiting for a session's authentication ended.
enum Wait {
    Up(u64),
    Refused,
    Timeout,
    Stop(Ended),
}

/// Why the serving loop ends: asked to stop (`None`), or a cluster actor failed.
type Ended = Option<String>;

fn ended(why: Ended) -> Result<(), WorkerError> {
    match why {
        None => Ok(()),
        Some(actor) => Err(WorkerError::Escalated(actor)),
    }
}

/// How a worker joins.
pub struct JoinOptions {
    /// Unique node name.
    pub name: String,
    pub hostname: String,
    /// `HOST:PORT` of the head's cluster server.
    pub head_addr: String,
    pub cookie: String,
    /// The model to load; `None` asks the head for the one it serves.
    pub model: Option<PathBuf>,
    /// Address of the worker's own node server listener (`cluster.bind`; it accepts no session).
    pub bind: std::net::IpAddr,
    /// Mutual TLS to the head; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    /// This worker's own roots: paths from the head outside them are refused.
    pub roots: WorkerRoots,
    /// On a clean leave, how long running jobs get to reach a checkpoint and report it
    /// (`server.shutdown_grace_secs`).
    pub leave_grace: Duration,
}

fn reporter(link: HeadLink) -> crate::directory::Reporter {
    Arc::new(move |msg: JobMsg| {
        let msg = match msg {
            JobMsg::Progress {
                job_id,
                trainer,
                attempt,
                point,
            } => ToHead::JobProgress {
                trainer,
                job_id,
                attempt,
                point,
            },
            JobMsg::Finished {
                job_id,
                trainer,
                attempt,
                result,
            } => ToHead::JobFinished {
                trainer,
                job_id,
                attempt,
                result,
            },
            _ => return,
        };
        if !link.send(msg) {
            tracing::error!("the head is unreachable; a job report was lost");
        }
    })
}

/// Joins the head and serves until `stop` resolves (then leaves cleanly). `start_node` starts the
/// worker's actor tree on a model path: the configured one, or the head's, asked for once the
/// first session is up. Returns the node (if it started) so the caller can shut it down.
pub async fn run<F, Fut>(
    opts: JoinOptions,
    start_node: F,
    stop: impl std::future::Future<Output = ()>,
) -> (Option<Arc<Node>>, Result<(), WorkerError>)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<Arc<Node>, String>>,
{
    let node_cell: Arc<std::sync::OnceLock<Arc<Node>>> = Arc::default();
    let result = serve(opts, start_node, stop, node_cell.clone()).await;
    (node_cell.get().cloned(), result)
}

async fn serve<F, Fut>(
    opts: JoinOptions,
    start_node: F,
    stop: impl std::future::Future<Output = ()>,
    node_cell: Arc<std::sync::OnceLock<Arc<Node>>>,
) -> Result<(), WorkerError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<Arc<Node>, String>>,
{
    let JoinOptions {
        name,
        hostname,
        head_addr,
        cookie,
        model,
        bind,
        tls,
        leave_grace,
        roots,
    } = opts;
    let connector = tls
        .as_ref()
        .map(TlsFiles::connector)
        .transpose()
        .map_err(WorkerError::Start)?;
    // Its own listener (ractor_cluster always has one) on `cluster.bind` only; it accepts no
    // session anyway.
    let server = NodeServer::new(
        0,
        cookie,
        name.clone(),
        hostname.clone(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(bind);
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| WorkerError::Start(format!("cluster node server: {e}")))?;
    let (tx, mut events) = mpsc::unbounded_channel();
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "tessera-worker".into(),
            subscription: Box::new(Events {
                tx,
                authenticated: Mutex::default(),
            }),
        })
        .map_err(|e| WorkerError::Start(e.to_string()))?;
    let model_reply = Arc::new(Mutex::new(None));
    let link = HeadLink::new(name.clone());
    let (agent, _) = Actor::spawn(
        None,
        WorkerAgent,
        WorkerAgentArgs {
            name: name.clone(),
            node: node_cell.clone(),
            hostname: hostname.clone(),
            model_reply: model_reply.clone(),
            link: link.clone(),
            roots: roots.clone(),
        },
    )
    .await
    .map_err(|e| WorkerError::Start(format!("worker agent: {e}")))?;
    let mut start_node = Some(start_node);
    // A configured model starts the node before the first dial: the worker serves as soon as it joins.
    if let Some(path) = &model {
        let start = start_node.take().expect("once");
        let node = start(path.clone()).await.map_err(WorkerError::Start)?;
        attach(&node_cell, node, &link).await;
    }
    let (watch, mut escalations) = ClusterWatch::start(HealthBoard::default())
        .await
        .map_err(WorkerError::Start)?;
    watch.adopt("cluster-node-server", server.get_cell());
    watch.adopt("cluster-worker-agent", agent.get_cell());
    let stop = async move {
        tokio::select! {
            _ = stop => None,
            down = escalations.recv() => Some(down.unwrap_or_else(|| "cluster-supervisor".into())),
        }
    };
    let mut stop = std::pin::pin!(stop);
    let mut backoff = Duration::from_millis(250);
    let max_backoff = Duration::from_secs(5);
    let result = loop {
        link.forget();
        // Dial.
        let connected = tokio::select! {
            why = &mut stop => break ended(why),
            r = tls::dial(&server, &head_addr, connector.as_ref(), Duration::from_secs(10)) => r,
        };
        if let Err(tls::DialError::Tls(e)) = connected {
            break Err(WorkerError::Tls(e));
        }
        if let Err(e) = connected {
            tracing::warn!(head = %head_addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "head not reachable; retrying");
            tokio::select! {
                why = &mut stop => break ended(why),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max_backoff);
            continue;
        }
        // Wait for this session's authentication (or its failure); a late close of an earlier
        // session is not this one's.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let session = loop {
            let event = tokio::select! {
                why = &mut stop => break Wait::Stop(why),
                e = events.recv() => e,
                _ = tokio::time::sleep_until(deadline) => break Wait::Timeout,
            };
            match event {
                Some(SessionEvent::Authenticated { id }) => break Wait::Up(id),
                Some(SessionEvent::Disconnected {
                    authenticated: false,
                    ..
                }) => break Wait::Refused,
                Some(SessionEvent::Disconnected { .. }) => {}
                None => break Wait::Timeout,
            }
        };
        let session = match session {
            Wait::Up(id) => id,
            Wait::Refused => break Err(WorkerError::Cookie(head_addr.clone())),
            Wait::Stop(why) => break ended(why),
            Wait::Timeout => {
                tracing::warn!(head = %head_addr, "no authenticated session; redialling");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        // The head's port becomes visible through pg shortly after authentication; then it
        // gives this session its key.
        for _ in 0..100 {
            if head().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !link.hello(Duration::from_secs(10)).await {
            tracing::warn!(head = %head_addr, "the head gave this session no key; redialling");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max_backoff);
            continue;
        }
        if let Some(start) = start_node.take() {
            // No model configured: load the head's (a path on shared storage).
            let (reply, answer) = tokio::sync::oneshot::channel();
            *model_reply.lock().expect("model reply") = Some(reply);
            link.send(ToHead::WhichModel);
            let path = match tokio::time::timeout(Duration::from_secs(10), answer).await {
                Ok(Ok(path)) => path,
                _ => {
                    tracing::warn!("the head did not say which model to load; asking again");
                    start_node = Some(start);
                    continue;
                }
            };
            tracing::info!(model = %path.display(), "loading the head's model");
            let node = start(path).await.map_err(WorkerError::Start)?;
            attach(&node_cell, node, &link).await;
        }
        let node = node_cell.get().cloned().expect("started");
        let info = WorkerAgent::info(&node, &hostname).await;
        if link.send(ToHead::Register(Box::new(info))) {
            tracing::info!(head = %head_addr, node = %name, "joined the cluster");
            backoff = Duration::from_millis(250);
        }
        // Serve until this session drops.
        tokio::select! {
            why = &mut stop => break ended(why),
            _ = async {
                loop {
                    match events.recv().await {
                        Some(SessionEvent::Disconnected { id, .. }) if id == session => return,
                        None => return,
                        Some(_) => {}
                    }
                }
            } => {}
        }
        tracing::warn!(head = %head_addr, retry_in_ms = backoff.as_millis() as u64, "lost the head; redialling");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    };
    if result.is_ok() {
        // A clean leave: running jobs stop at a checkpoint and say so while the session is up,
        // so the head queues them again as stopped (not as lost, which would count an attempt).
        link.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(node) = node_cell.get() {
            stop_jobs_at_a_checkpoint(node, leave_grace).await;
        }
        link.send(ToHead::Leaving);
        // Let the message reach the head before the session closes.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    watch.stopping();
    agent.stop(None);
    server.stop(None);
    result
}

/// Stops this node's running jobs at a checkpoint and waits (at most `grace`) until every trainer
/// has ended its run (its `Stopped` report is then on its way to the head).
async fn stop_jobs_at_a_checkpoint(node: &Node, grace: Duration) {
    let mut running = Vec::new();
    for (name, entry) in node.directory.trainers() {
        if let Some((job, _)) = entry.current().await {
            entry.cancel(&job, true);
            running.push((name, entry));
        }
    }
    if running.is_empty() {
        return;
    }
    tracing::info!(
        jobs = running.len(),
        "leaving: stopping running jobs at a checkpoint"
    );
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let mut busy = 0;
        for (_, entry) in &running {
            if entry.current().await.is_some() {
                busy += 1;
            }
        }
        if busy == 0 {
            // A trainer's thread reports its result just after it says it is done.
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                busy,
                grace_s = grace.as_secs_f64(),
                "jobs did not reach a checkpoint in time; leaving anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes a started node the agent's, routes its job reports to the head, and waits until its
/// replicas have loaded their model (so it joins ready to serve).
async fn attach(cell: &std::sync::OnceLock<Arc<Node>>, node: Arc<Node>, link: &HeadLink) {
    node.directory.set_reporter(Some(reporter(link.clone())));
    let t0 = std::time::Instant::now();
    while !node.placement.replicas.is_empty()
        && node
            .router
            .replicas()
            .iter()
            .any(|r| r.state != ActorState::Running)
        && t0.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = cell.set(node);
}

/// A job's paths inside the worker's roots: its dataset, its output and its base model.
fn confine_job(roots: &WorkerRoots, job: &tessera_engine::train::TrainJob) -> Result<(), String> {
    roots.dataset(&job.dataset_path)?;
    roots.adapter(&job.output_path)?;
    match &job.base_model {
        Some(m) => roots.model(m),
        None => Ok(()),
    }
}
