//! The job manager actor: the queue and the record of fine-tune jobs. It persists every change in
//! the [`JobStore`], refuses a job whose output overlaps a live job's, assigns queued jobs
//! (priority, then FIFO) to idle trainers as numbered attempts, records progress, turns trainer
//! outcomes into final states, and stops on shutdown running jobs at a checkpoint so they resume on
//! the next start.
//!
//! Fencing: every assignment, progress point and result carries the job's attempt number; reports
//! of any other attempt than the current one are ignored and their trainer is told to stop without
//! writing. An attempt that ends without an outcome (the head or the trainer crashed or was lost)
//! is counted: the job is re-queued until `max_attempts` such attempts, then fails with the last
//! reason. A cancel asked for before such an end still cancels the job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use super::messages::{JobMsg, JobStats};
use super::store::JobStore;
use super::types::{Assignment, JobError, JobEvent, JobRecord, JobState, RunResult};
use crate::directory::Directory;
use crate::tags;

/// How long a trainer that refused a job (busy) is left alone before it is offered one again.
const REFUSED_BACKOFF: Duration = Duration::from_secs(2);

pub struct JobManagerArgs {
    pub db_path: PathBuf,
    pub directory: Directory,
    /// This node's name, recorded with each run.
    pub node: String,
    /// Attempts that may end without an outcome before the job fails (at least 1).
    pub max_attempts: u32,
    /// Queued jobs at most: past it `Submit` is refused with [`JobError::QueueFull`].
    pub max_queued: usize,
}

pub struct JobManagerState {
    myself: ActorRef<JobMsg>,
    store: JobStore,
    directory: Directory,
    max_attempts: u32,
    max_queued: usize,
    /// Trainer name → (job id, attempt) it runs.
    busy: HashMap<String, (String, u32)>,
    /// Trainers that refused a job (busy with one we do not know of), until when they are skipped.
    refused: HashMap<String, Instant>,
    tokens_per_s: HashMap<String, f64>,
    subscribers: HashMap<String, Vec<mpsc::Sender<JobEvent>>>,
    draining: Option<Vec<RpcReplyPort<()>>>,
    /// Queued jobs that no trainer of the cluster can take (their tags), and why.
    pending: HashMap<String, String>,
}

pub struct JobManager;

impl Actor for JobManager {
    type Msg = JobMsg;
    type State = JobManagerState;
    type Arguments = JobManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<JobMsg>,
        args: JobManagerArgs,
    ) -> Result<JobManagerState, ActorProcessingErr> {
        let store = JobStore::open(&args.db_path)?;
        tracing::info!(node = %args.node, db = %args.db_path.display(), "job store open");
        // Which jobs are really running? Ask the trainers (after a manager restart some are).
        let mut busy = HashMap::new();
        for (name, entry) in args.directory.trainers() {
            if let Some((job, attempt)) = entry.current().await {
                let current = store
                    .get(&job, false)
                    .is_ok_and(|r| r.status == JobState::Running && r.attempts == attempt);
                if current {
                    busy.insert(name, (job, attempt));
                } else {
                    tracing::warn!(trainer = %name, %job, attempt, "trainer runs a stale attempt; told to stop without writing");
                    entry.fence(&job, attempt);
                }
            }
        }
        let mut state = JobManagerState {
            myself,
            store,
            directory: args.directory,
            max_attempts: args.max_attempts.max(1),
            max_queued: args.max_queued,
            busy,
            refused: HashMap::new(),
            tokens_per_s: HashMap::new(),
            subscribers: HashMap::new(),
            draining: None,
            pending: HashMap::new(),
        };
        for id in state.store.with_status(JobState::Running)? {
            if !state.busy.values().any(|(j, _)| j == &id) {
                let attempt = state.store.get(&id, false)?.attempts;
                state.interrupted(
                    &id,
                    &format!(
                        "attempt {attempt} was running when the head stopped (a crash or a kill)"
                    ),
                )?;
            }
        }
        Ok(state)
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
                // Checked and inserted in one message: two submissions cannot both pass the
                // queue bound or the output check.
                let result = state
                    .queue_has_room()
                    .and_then(|()| state.output_conflict(&spec.train.output_path))
                    .and_then(|()| state.store.insert(&id, &spec));
                if let Ok(record) = &result {
                    tracing::info!(job = %record.id, priority = record.priority.as_str(), output = %record.output_path.display(), "job queued");
                }
                let _ = reply.send(result);
                state.dispatch();
            }
            JobMsg::Get(id, reply) => {
                let _ = reply.send(state.store.get(&id, true).map(|r| state.with_reason(r)));
            }
            JobMsg::List(query, reply) => {
                let _ = reply.send(state.store.list(&query).map(|mut page| {
                    page.jobs = page
                        .jobs
                        .into_iter()
                        .map(|r| state.with_reason(r))
                        .collect();
                    page
                }));
            }
            JobMsg::Cancel(id, reply) => {
                let _ = reply.send(state.cancel(&id));
            }
            JobMsg::Subscribe(id, sender, reply) => {
                let record = state.store.get(&id, false).map(|r| state.with_reason(r));
                if let Ok(r) = &record {
                    // While shutting down a stream gets the record and ends.
                    if !r.status.is_final() && state.draining.is_none() {
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
                        .map(|(t, (j, _))| (t.clone(), j.clone()))
                        .collect(),
                });
            }
            JobMsg::Progress {
                job_id,
                trainer,
                attempt,
                point,
            } => {
                if state.is_current(&trainer, &job_id, attempt) {
                    state.store.add_progress(&job_id, &point)?;
                    state
                        .tokens_per_s
                        .insert(job_id.clone(), point.tokens_per_s);
                    state.notify(&job_id, JobEvent::Progress(point));
                } else {
                    state.stale(&trainer, &job_id, attempt);
                }
            }
            JobMsg::Finished {
                job_id,
                trainer,
                attempt,
                result,
            } => state.finished(&job_id, &trainer, attempt, result)?,
            JobMsg::TrainersChanged => {
                let live = state.directory.trainers();
                state.refused.retain(|t, _| live.contains_key(t));
                let lost: Vec<(String, (String, u32))> = state
                    .busy
                    .iter()
                    .filter(|(t, _)| !live.contains_key(*t))
                    .map(|(t, j)| (t.clone(), j.clone()))
                    .collect();
                for (trainer, (job, attempt)) in lost {
                    state.busy.remove(&trainer);
                    state.tokens_per_s.remove(&job);
                    state.interrupted(
                        &job,
                        &format!("trainer {trainer} was lost while attempt {attempt} ran"),
                    )?;
                }
                state.dispatch();
            }
            JobMsg::Dispatch => state.dispatch(),
            JobMsg::Shutdown(reply) => {
                for (trainer, (job, _)) in &state.busy {
                    if let Some(t) = state.directory.trainers().get(trainer) {
                        t.cancel(job, true);
                    }
                }
                // Open `/jobs/{id}/events` streams end now: they must not hold the HTTP drain.
                state.subscribers.clear();
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
        let now = Instant::now();
        self.refused.retain(|_, until| *until > now);
        let trainers = self.directory.trainers();
        let mut idle: Vec<(String, crate::directory::TrainerEntry)> = trainers
            .iter()
            .filter(|(name, _)| !self.busy.contains_key(*name) && !self.refused.contains_key(*name))
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect();
        self.pending.clear();
        for id in queued {
            let spec = match self.store.spec(&id) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "reading a queued job");
                    continue;
                }
            };
            // The first idle trainer whose node carries the job's tags; a job that no trainer
            // of the cluster could take waits with the reason shown, and does not hold up others.
            if !trainers
                .values()
                .any(|t| tags::satisfies(&t.tags, &spec.tags))
            {
                self.pending.insert(
                    id.clone(),
                    format!(
                        "no node carries the tags {}; it starts when one joins",
                        tags::describe(&spec.tags)
                    ),
                );
                continue;
            }
            let Some(at) = idle
                .iter()
                .position(|(_, t)| tags::satisfies(&t.tags, &spec.tags))
            else {
                continue;
            };
            let (name, trainer) = idle.remove(at);
            let started = (|| {
                let resume = self.store.get(&id, false)?.attempts > 0;
                let attempt = self.store.mark_running(&id, &name, &trainer.node)?;
                let sent = trainer.run(Assignment {
                    job_id: id.clone(),
                    attempt,
                    job: spec.train.clone(),
                    resume,
                });
                if let Err(e) = sent {
                    self.store.requeue(&id)?;
                    return Err(JobError::Store(format!("trainer {name}: {e}")));
                }
                Ok(attempt)
            })();
            match started {
                Ok(attempt) => {
                    tracing::info!(job = %id, trainer = %name, attempt, "job assigned");
                    self.busy.insert(name, (id.clone(), attempt));
                    self.notify_state(&id);
                }
                Err(e) => tracing::error!(job = %id, error = %e, "could not start job"),
            }
        }
    }

    /// No two live jobs write the same directory or one inside the other (a checkpoint directory
    /// of one would be deleted by the other's `save_total_limit`).
    fn output_conflict(&self, path: &Path) -> Result<(), JobError> {
        for (id, status, other) in self.store.live_outputs()? {
            if other.starts_with(path) || path.starts_with(&other) {
                return Err(JobError::OutputConflict {
                    path: path.display().to_string(),
                    other: id,
                    other_path: other.display().to_string(),
                    state: status.as_str().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Whether a report of `attempt` of `job` by `trainer` is of the attempt that runs now.
    fn is_current(&self, trainer: &str, job: &str, attempt: u32) -> bool {
        self.busy
            .get(trainer)
            .is_some_and(|(j, a)| j == job && *a == attempt)
    }

    /// A report of an attempt that no longer runs: its trainer stops it without writing.
    fn stale(&self, trainer: &str, job: &str, attempt: u32) {
        tracing::warn!(%trainer, %job, attempt, "report of a stale attempt ignored; its trainer is told to stop without writing");
        if let Some(t) = self.directory.trainers().get(trainer) {
            t.fence(job, attempt);
        }
    }

    /// The record with why it waits, if it waits for a node with its tags.
    fn with_reason(&self, mut record: JobRecord) -> JobRecord {
        if record.status == JobState::Queued {
            record.pending_reason = self.pending.get(&record.id).cloned();
        }
        record
    }

    /// Refuses a new job while `max_queued` are waiting.
    fn queue_has_room(&self) -> Result<(), JobError> {
        let queued = self.store.count(JobState::Queued)?;
        if queued >= self.max_queued {
            return Err(JobError::QueueFull {
                queued,
                max: self.max_queued,
            });
        }
        Ok(())
    }

    /// An attempt ended without an outcome: cancelled if that was asked, failed after
    /// `max_attempts` such ends, otherwise queued again to resume from its checkpoint.
    fn interrupted(&mut self, id: &str, why: &str) -> Result<(), JobError> {
        if self.store.cancel_requested(id)? {
            self.store.finish(id, JobState::Cancelled, None, None)?;
            tracing::info!(job = %id, %why, "job cancelled (the cancel was asked before it stopped)");
        } else {
            let n = self.store.interrupted(id, why)?;
            if n >= self.max_attempts {
                let error = format!(
                    "gave up after {n} attempts that ended without an outcome (jobs.max_attempts = {}); the last: {why}",
                    self.max_attempts
                );
                tracing::error!(job = %id, %error, "job failed");
                self.store
                    .finish(id, JobState::Failed, Some(&error), None)?;
            } else {
                tracing::warn!(job = %id, %why, interruptions = n, "job re-queued to resume from its checkpoint");
                self.store.requeue(id)?;
            }
        }
        self.notify_state(id);
        Ok(())
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
                if let Some((trainer, _)) = self.busy.iter().find(|(_, (j, _))| j == id) {
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

    fn finished(
        &mut self,
        id: &str,
        trainer: &str,
        attempt: u32,
        result: RunResult,
    ) -> Result<(), JobError> {
        if !self.is_current(trainer, id, attempt) {
            tracing::warn!(job = %id, %trainer, attempt, "result of an attempt that is not the current one; ignored");
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
            RunResult::Refused { reason } => {
                // Not a failed attempt: the job waits for another trainer, and this one is left
                // alone for a while (no assign-refuse loop).
                tracing::warn!(job = %id, %trainer, %reason, "trainer refused the job; back in the queue");
                if self.store.cancel_requested(id)? {
                    self.store.finish(id, JobState::Cancelled, None, None)?;
                } else {
                    self.store.requeue(id)?;
                }
                self.refused
                    .insert(trainer.to_string(), Instant::now() + REFUSED_BACKOFF);
                // The timer task runs on after its handle is dropped.
                drop(self.myself.send_after(REFUSED_BACKOFF, || JobMsg::Dispatch));
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
