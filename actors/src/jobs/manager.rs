//! The job manager actor: the queue and the record of fine-tune jobs. It persists every change in
//! the [`JobStore`], assigns queued jobs (priority, then FIFO) to idle trainers, records progress,
//! turns trainer outcomes into final states, re-queues the jobs of lost trainers and of a head that
//! died, and on shutdown stops running jobs at a checkpoint so they resume on the next start.

use std::collections::HashMap;
use std::path::PathBuf;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::store::JobStore;
use super::types::{
    JobError, JobEvent, JobPage, JobQuery, JobRecord, JobSpec, JobState, ProgressPoint, RunResult,
};
use crate::directory::Directory;
use crate::trainer::Assignment;

type Reply<T> = RpcReplyPort<Result<T, JobError>>;

pub enum JobMsg {
    Submit(JobSpec, Reply<JobRecord>),
    Get(String, Reply<JobRecord>),
    List(JobQuery, Reply<JobPage>),
    Cancel(String, Reply<JobRecord>),
    /// Progress and state changes of a job, until it ends.
    Subscribe(String, mpsc::Sender<JobEvent>, Reply<JobRecord>),
    Stats(RpcReplyPort<JobStats>),
    /// From a trainer's thread.
    Progress {
        job_id: String,
        trainer: String,
        point: ProgressPoint,
    },
    Finished {
        job_id: String,
        trainer: String,
        result: RunResult,
    },
    /// The directory's trainers changed (one started, restarted or was lost).
    TrainersChanged,
    /// Stop assigning; stop running jobs at a checkpoint (they go back to the queue); reply when
    /// every trainer has reported.
    Shutdown(RpcReplyPort<()>),
}

impl ractor::Message for JobMsg {}

/// For `/metrics` and `/cluster`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStats {
    pub counts: Vec<(JobState, usize)>,
    /// Sum over running jobs of their latest tokens/s.
    pub training_tokens_per_s: f64,
    /// Trainer name → the job it runs.
    pub running: Vec<(String, String)>,
}

pub struct JobManagerArgs {
    pub db_path: PathBuf,
    pub directory: Directory,
    /// This node's name, recorded with each run.
    pub node: String,
}

pub struct JobManagerState {
    store: JobStore,
    directory: Directory,
    /// Trainer name → job id.
    busy: HashMap<String, String>,
    tokens_per_s: HashMap<String, f64>,
    subscribers: HashMap<String, Vec<mpsc::Sender<JobEvent>>>,
    draining: Option<Vec<RpcReplyPort<()>>>,
}

pub struct JobManager;

impl Actor for JobManager {
    type Msg = JobMsg;
    type State = JobManagerState;
    type Arguments = JobManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<JobMsg>,
        args: JobManagerArgs,
    ) -> Result<JobManagerState, ActorProcessingErr> {
        let store = JobStore::open(&args.db_path)?;
        tracing::info!(node = %args.node, db = %args.db_path.display(), "job store open");
        // Which jobs are really running? Ask the trainers (after a manager restart some are).
        let mut busy = HashMap::new();
        for (name, entry) in args.directory.trainers() {
            if let Some(job) = entry.current().await {
                busy.insert(name, job);
            }
        }
        for id in store.with_status(JobState::Running)? {
            if !busy.values().any(|j| j == &id) {
                tracing::info!(job = %id, "job was running when its trainer or the head stopped; re-queued to resume from its checkpoint");
                store.requeue(&id)?;
            }
        }
        Ok(JobManagerState {
            store,
            directory: args.directory,
            busy,
            tokens_per_s: HashMap::new(),
            subscribers: HashMap::new(),
            draining: None,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<JobMsg>,
        state: &mut JobManagerState,
    ) -> Result<(), ActorProcessingErr> {
        state.dispatch();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<JobMsg>,
        msg: JobMsg,
        state: &mut JobManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMsg::Submit(spec, reply) => {
                let id = format!("ft-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
                let result = state.store.insert(&id, &spec);
                if let Ok(record) = &result {
                    tracing::info!(job = %record.id, priority = record.priority.as_str(), output = %record.output_path.display(), "job queued");
                }
                let _ = reply.send(result);
                state.dispatch();
            }
            JobMsg::Get(id, reply) => {
                let _ = reply.send(state.store.get(&id, true));
            }
            JobMsg::List(query, reply) => {
                let _ = reply.send(state.store.list(&query));
            }
            JobMsg::Cancel(id, reply) => {
                let _ = reply.send(state.cancel(&id));
            }
            JobMsg::Subscribe(id, sender, reply) => {
                let record = state.store.get(&id, false);
                if let Ok(r) = &record {
                    if !r.status.is_final() {
                        state.subscribers.entry(id).or_default().push(sender);
                    }
                }
                let _ = reply.send(record);
            }
            JobMsg::Stats(reply) => {
                let _ = reply.send(JobStats {
                    counts: state.store.counts().unwrap_or_default(),
                    training_tokens_per_s: state.tokens_per_s.values().sum(),
                    running: state
                        .busy
                        .iter()
                        .map(|(t, j)| (t.clone(), j.clone()))
                        .collect(),
                });
            }
            JobMsg::Progress {
                job_id,
                trainer,
                point,
            } => {
                if state.busy.get(&trainer) == Some(&job_id) {
                    state.store.add_progress(&job_id, &point)?;
                    state
                        .tokens_per_s
                        .insert(job_id.clone(), point.tokens_per_s);
                    state.notify(&job_id, JobEvent::Progress(point));
                }
            }
            JobMsg::Finished {
                job_id,
                trainer,
                result,
            } => state.finished(&job_id, &trainer, result)?,
            JobMsg::TrainersChanged => {
                let live = state.directory.trainers();
                let lost: Vec<(String, String)> = state
                    .busy
                    .iter()
                    .filter(|(t, _)| !live.contains_key(*t))
                    .map(|(t, j)| (t.clone(), j.clone()))
                    .collect();
                for (trainer, job) in lost {
                    tracing::warn!(%trainer, %job, "trainer lost while running a job; re-queued");
                    state.busy.remove(&trainer);
                    state.tokens_per_s.remove(&job);
                    state.store.requeue(&job)?;
                    state.notify_state(&job);
                }
                state.dispatch();
            }
            JobMsg::Shutdown(reply) => {
                for (trainer, job) in &state.busy {
                    if let Some(t) = state.directory.trainers().get(trainer) {
                        t.cancel(job, true);
                    }
                }
                state.draining.get_or_insert_with(Vec::new).push(reply);
                state.maybe_drained();
            }
        }
        Ok(())
    }
}

impl JobManagerState {
    /// Gives queued jobs to idle trainers.
    fn dispatch(&mut self) {
        if self.draining.is_some() {
            return;
        }
        let queued = match self.store.queued() {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "reading the job queue");
                return;
            }
        };
        let mut idle: Vec<(String, crate::directory::TrainerEntry)> = self
            .directory
            .trainers()
            .into_iter()
            .filter(|(name, _)| !self.busy.contains_key(name))
            .collect();
        idle.reverse();
        for id in queued {
            let Some((name, trainer)) = idle.pop() else {
                break;
            };
            let started = (|| {
                let spec = self.store.spec(&id)?;
                let attempts = self.store.get(&id, false)?.attempts;
                trainer
                    .run(Assignment {
                        job_id: id.clone(),
                        job: spec.train,
                        resume: attempts > 0,
                    })
                    .map_err(|e| JobError::Store(format!("trainer {name}: {e}")))?;
                self.store.mark_running(&id, &name, &trainer.node)
            })();
            match started {
                Ok(()) => {
                    tracing::info!(job = %id, trainer = %name, "job assigned");
                    self.busy.insert(name, id.clone());
                    self.notify_state(&id);
                }
                Err(e) => tracing::error!(job = %id, error = %e, "could not start job"),
            }
        }
    }

    fn cancel(&mut self, id: &str) -> Result<JobRecord, JobError> {
        let record = self.store.get(id, false)?;
        match record.status {
            JobState::Queued => {
                self.store.request_cancel(id)?;
                self.store.finish(id, JobState::Cancelled, None, None)?;
                tracing::info!(job = %id, "queued job cancelled");
                self.notify_state(id);
            }
            JobState::Running => {
                self.store.request_cancel(id)?;
                if let Some((trainer, _)) = self.busy.iter().find(|(_, j)| *j == id) {
                    if let Some(t) = self.directory.trainers().get(trainer) {
                        t.cancel(id, false);
                    }
                }
                tracing::info!(job = %id, "running job: cancel requested (takes effect after the current step)");
            }
            s => {
                return Err(JobError::Final {
                    id: id.to_string(),
                    state: s.as_str(),
                })
            }
        }
        self.store.get(id, false)
    }

    fn finished(&mut self, id: &str, trainer: &str, result: RunResult) -> Result<(), JobError> {
        if self.busy.get(trainer).map(String::as_str) != Some(id) {
            tracing::warn!(job = %id, %trainer, "report from a trainer not running this job; ignored");
            return Ok(());
        }
        self.busy.remove(trainer);
        self.tokens_per_s.remove(id);
        match result {
            RunResult::Succeeded { summary } => {
                self.store
                    .finish(id, JobState::Succeeded, None, Some(&summary))?;
                tracing::info!(job = %id, "job succeeded");
            }
            RunResult::Failed { error } => {
                self.store
                    .finish(id, JobState::Failed, Some(&error), None)?;
            }
            RunResult::Stopped { step } => {
                if self.store.cancel_requested(id)? {
                    self.store.finish(id, JobState::Cancelled, None, None)?;
                    tracing::info!(job = %id, step, "running job cancelled");
                } else {
                    self.store.requeue(id)?;
                    tracing::info!(job = %id, step, "job stopped at a checkpoint; back in the queue");
                }
            }
        }
        self.notify_state(id);
        self.dispatch();
        self.maybe_drained();
        Ok(())
    }

    fn maybe_drained(&mut self) {
        if self.busy.is_empty() {
            if let Some(replies) = self.draining.as_mut() {
                for reply in replies.drain(..) {
                    let _ = reply.send(());
                }
            }
        }
    }

    fn notify(&mut self, id: &str, event: JobEvent) {
        if let Some(subs) = self.subscribers.get_mut(id) {
            // Progress is best effort: a subscriber that does not keep up misses points.
            subs.retain(|s| match s.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    fn notify_state(&mut self, id: &str) {
        let Ok(record) = self.store.get(id, false) else {
            return;
        };
        let last = record.status.is_final();
        self.notify(id, JobEvent::State(Box::new(record)));
        if last {
            self.subscribers.remove(id);
        }
    }
}
