//! The node's directory: where actors find each other across restarts. The supervisor writes it
//! (a restarted child gets a new `ActorRef`), the cluster adds the trainers of other nodes; the job
//! manager and trainers read it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use ractor::ActorRef;

use crate::jobs::messages::JobMsg;
use crate::jobs::Assignment;
use crate::tags::Tags;

/// The job and attempt a trainer runs, when it answers.
pub type CurrentFuture = Pin<Box<dyn Future<Output = Option<(String, u32)>> + Send>>;

/// A trainer as the job manager reaches it: an actor of this node
/// ([`crate::trainer::LocalTrainer`]) or a trainer of another node through the cluster
/// (`cluster/head.rs`). The directory knows nothing else of either.
pub trait Trainer: Send + Sync {
    fn run(&self, assignment: Assignment) -> Result<(), String>;
    /// Stop the job after its current step; `checkpoint` saves the steps done first.
    fn cancel(&self, job_id: &str, checkpoint: bool);
    /// `attempt` of `job_id` is stale: stop it without writing anything.
    fn fence(&self, job_id: &str, attempt: u32);
    /// The job and attempt it runs.
    fn current(&self) -> CurrentFuture;
}

#[derive(Clone)]
pub struct TrainerEntry {
    pub actor: Arc<dyn Trainer>,
    /// It runs on this node (a worker takes jobs for its own trainers only).
    pub local: bool,
    pub node: String,
    pub device: String,
    /// Its node's tags (jobs with `placement.tags` go only to trainers that satisfy them).
    pub tags: Tags,
}

impl TrainerEntry {
    pub fn run(&self, assignment: Assignment) -> Result<(), String> {
        self.actor.run(assignment)
    }

    pub fn cancel(&self, job_id: &str, checkpoint: bool) {
        self.actor.cancel(job_id, checkpoint)
    }

    pub fn fence(&self, job_id: &str, attempt: u32) {
        self.actor.fence(job_id, attempt)
    }

    /// The job and attempt it runs.
    pub async fn current(&self) -> Option<(String, u32)> {
        self.actor.current().await
    }
}

/// Where job reports go on a node without a job manager (a worker sends them to the head).
pub type Reporter = Arc<dyn Fn(JobMsg) + Send + Sync>;

#[derive(Default)]
struct Entries {
    job_manager: Option<ActorRef<JobMsg>>,
    reporter: Option<Reporter>,
    trainers: BTreeMap<String, TrainerEntry>,
}

#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<Entries>>,
}

impl Directory {
    pub fn job_manager(&self) -> Option<ActorRef<JobMsg>> {
        self.inner.read().expect("directory").job_manager.clone()
    }

    pub fn set_job_manager(&self, actor: Option<ActorRef<JobMsg>>) {
        self.inner.write().expect("directory").job_manager = actor;
    }

    pub fn set_reporter(&self, reporter: Option<Reporter>) {
        self.inner.write().expect("directory").reporter = reporter;
    }

    /// Delivers a trainer's report to the job manager (local, or the head's through the cluster).
    pub fn report(&self, msg: JobMsg) -> Result<(), String> {
        let (manager, reporter) = {
            let e = self.inner.read().expect("directory");
            (e.job_manager.clone(), e.reporter.clone())
        };
        match (manager, reporter) {
            (Some(m), _) => m.cast(msg).map_err(|e| e.to_string()),
            (None, Some(r)) => {
                r(msg);
                Ok(())
            }
            (None, None) => Err("no job manager".into()),
        }
    }

    pub fn trainers(&self) -> BTreeMap<String, TrainerEntry> {
        self.inner.read().expect("directory").trainers.clone()
    }

    /// Trainers of this node only (the worker side).
    pub fn local_trainer(&self, name: &str) -> Option<TrainerEntry> {
        self.inner
            .read()
            .expect("directory")
            .trainers
            .get(name)
            .filter(|t| t.local)
            .cloned()
    }

    pub fn set_trainer(&self, name: &str, entry: Option<TrainerEntry>) {
        let mut e = self.inner.write().expect("directory");
        match entry {
            Some(t) => e.trainers.insert(name.to_string(), t),
            None => e.trainers.remove(name),
        };
    }

    /// Forgets every trainer of `node`; returns whether there were any.
    pub fn remove_node(&self, node: &str) -> bool {
        let mut e = self.inner.write().expect("directory");
        let before = e.trainers.len();
        e.trainers.retain(|_, t| t.node != node);
        before != e.trainers.len()
    }
}
