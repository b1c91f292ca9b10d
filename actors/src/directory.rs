//! The node's directory: where actors find each other across restarts. The supervisor writes it
//! (a restarted child gets a new `ActorRef`); the job manager and trainers read it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ractor::ActorRef;

use crate::jobs::JobMsg;
use crate::trainer::TrainerMsg;

#[derive(Clone)]
pub struct TrainerEntry {
    pub actor: ActorRef<TrainerMsg>,
    pub node: String,
    pub device: String,
}

#[derive(Default)]
struct Entries {
    job_manager: Option<ActorRef<JobMsg>>,
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

    pub fn trainers(&self) -> BTreeMap<String, TrainerEntry> {
        self.inner.read().expect("directory").trainers.clone()
    }

    pub fn set_trainer(&self, name: &str, entry: Option<TrainerEntry>) {
        let mut e = self.inner.write().expect("directory");
        match entry {
            Some(t) => e.trainers.insert(name.to_string(), t),
            None => e.trainers.remove(name),
        };
    }
}
