//! The node's directory: where actors find each other across restarts. The supervisor writes it
//! (a restarted child gets a new `ActorRef`), the cluster adds the trainers of other nodes; the job
//! manager and trainers read it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::ActorRef;

use crate::jobs::{Assignment, JobMsg};
use crate::tags::Tags;
use crate::trainer::TrainerMsg;

/// A trainer on another node, reached through the cluster (issue 6).
pub trait RemoteTrainer: Send + Sync {
    fn run(&self, assignment: Assignment) -> Result<(), String>;
    fn cancel(&self, job_id: &str, checkpoint: bool);
    /// `attempt` of `job_id` is stale: stop it without writing anything.
    fn fence(&self, job_id: &str, attempt: u32);
    /// The job and attempt it runs, as last reported.
    fn current(&self) -> Option<(String, u32)>;
}

#[derive(Clone)]
pub enum TrainerRef {
    Local(ActorRef<TrainerMsg>),
    Remote(Arc<dyn RemoteTrainer>),
}

#[derive(Clone)]
pub struct TrainerEntry {
    pub actor: TrainerRef,
    pub node: String,
    pub device: String,
    /// Its node's tags (jobs with `placement.tags` go only to trainers that satisfy them).
    pub tags: Tags,
}

impl TrainerEntry {
    pub fn run(&self, assignment: Assignment) -> Result<(), String> {
        match &self.actor {
            TrainerRef::Local(a) => a
                .cast(TrainerMsg::Run(Box::new(assignment)))
                .map_err(|e| e.to_string()),
            TrainerRef::Remote(r) => r.run(assignment),
        }
    }

    pub fn cancel(&self, job_id: &str, checkpoint: bool) {
        match &self.actor {
            TrainerRef::Local(a) => {
                let _ = a.cast(TrainerMsg::Cancel {
                    job_id: job_id.to_string(),
                    checkpoint,
                });
            }
            TrainerRef::Remote(r) => r.cancel(job_id, checkpoint),
        }
    }

    pub fn fence(&self, job_id: &str, attempt: u32) {
        match &self.actor {
            TrainerRef::Local(a) => {
                let _ = a.cast(TrainerMsg::Fence {
                    job_id: job_id.to_string(),
                    attempt,
                });
            }
            TrainerRef::Remote(r) => r.fence(job_id, attempt),
        }
    }

    /// The job and attempt it runs.
    pub async fn current(&self) -> Option<(String, u32)> {
        match &self.actor {
            TrainerRef::Local(a) => match a
                .call(TrainerMsg::Current, Some(Duration::from_secs(2)))
                .await
            {
                Ok(ractor::rpc::CallResult::Success(job)) => job,
                _ => None,
            },
            TrainerRef::Remote(r) => r.current(),
        }
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
    pub fn local_trainer(&self, name: &str) -> Option<ActorRef<TrainerMsg>> {
        match self.inner.read().expect("directory").trainers.get(name) {
            Some(TrainerEntry {
                actor: TrainerRef::Local(a),
                ..
            }) => Some(a.clone()),
            _ => None,
        }
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
