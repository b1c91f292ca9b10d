//! The trainer actor: one per training device (group). It runs one job attempt at a time on its
//! own OS thread (tch calls block), forwards every step's progress and the outcome (tagged with the
//! attempt) to the job manager, honours cancel between steps (checkpointing first when the head
//! shuts down), refuses an assignment while busy, and stops a stale attempt without writing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tessera_engine::train::trainer::{train, TrainError, TrainOptions, TrainOutcome};
use tessera_engine::train::BaseQuantization;

use crate::directory::Directory;
use crate::health::now_s;
use crate::jobs::{Assignment, JobMsg, ProgressPoint, RunResult};

/// The directory's handle on a trainer actor of this node.
pub struct LocalTrainer(pub ActorRef<TrainerMsg>);

impl crate::directory::Trainer for LocalTrainer {
    fn run(&self, assignment: Assignment) -> Result<(), String> {
        self.0
            .cast(TrainerMsg::Run(Box::new(assignment)))
            .map_err(|e| e.to_string())
    }

    fn cancel(&self, job_id: &str, checkpoint: bool) {
        let _ = self.0.cast(TrainerMsg::Cancel {
            job_id: job_id.to_string(),
            checkpoint,
        });
    }

    fn fence(&self, job_id: &str, attempt: u32) {
        let _ = self.0.cast(TrainerMsg::Fence {
            job_id: job_id.to_string(),
            attempt,
        });
    }

    fn current(&self) -> crate::directory::CurrentFuture {
        let actor = self.0.clone();
        Box::pin(async move {
            match actor
                .call(TrainerMsg::Current, Some(std::time::Duration::from_secs(2)))
                .await
            {
                Ok(ractor::rpc::CallResult::Success(job)) => job,
                _ => None,
            }
        })
    }
}

pub enum TrainerMsg {
    Run(Box<Assignment>),
    /// Stop the job after its current step; `checkpoint` saves the steps done first.
    Cancel {
        job_id: String,
        checkpoint: bool,
    },
    /// This attempt of the job is stale (a newer one runs elsewhere): stop it, write nothing.
    Fence {
        job_id: String,
        attempt: u32,
    },
    /// The job and attempt it is running, if any.
    Current(RpcReplyPort<Option<(String, u32)>>),
    /// From its own thread: the attempt is over.
    Done {
        job_id: String,
        attempt: u32,
    },
}

impl ractor::Message for TrainerMsg {}

#[derive(Clone)]
pub struct TrainerArgs {
    pub name: String,
    pub node: String,
    pub device: tch::Device,
    pub kind: Option<tch::Kind>,
    /// The base model of jobs that name none.
    pub default_model: PathBuf,
    pub directory: Directory,
    /// Its node's tags.
    pub tags: crate::tags::Tags,
    /// Intra-op threads of its runs' torch pool (`None`: torch's default).
    pub threads: Option<usize>,
    /// A dataset file's size at most (`training.max_dataset_bytes`).
    pub max_dataset_bytes: u64,
}

struct Running {
    job_id: String,
    attempt: u32,
    cancel: Arc<AtomicBool>,
    checkpoint: Arc<AtomicBool>,
    stale: Arc<AtomicBool>,
}

impl Running {
    fn fence(&self) {
        self.checkpoint.store(false, Ordering::Relaxed);
        self.stale.store(true, Ordering::Relaxed);
        self.cancel.store(true, Ordering::Relaxed);
    }
}

pub struct TrainerState {
    args: TrainerArgs,
    running: Option<Running>,
}

pub struct TrainerActor;

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = TrainerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TrainerMsg>,
        args: TrainerArgs,
    ) -> Result<TrainerState, ActorProcessingErr> {
        Ok(TrainerState {
            args,
            running: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TrainerMsg>,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        // The thread outlives the actor only until its next step.
        if let Some(r) = &state.running {
            r.checkpoint.store(true, Ordering::Relaxed);
            r.cancel.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TrainerMsg>,
        msg: TrainerMsg,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerMsg::Run(assignment) => {
                if let Some(r) = &state.running {
                    // The manager thinks we are idle: tell it this job did not start. A newer
                    // attempt of the job we run makes ours stale.
                    if r.job_id == assignment.job_id && r.attempt < assignment.attempt {
                        r.fence();
                    }
                    tracing::warn!(trainer = %state.args.name, busy_with = %r.job_id, job = %assignment.job_id, "trainer busy; job refused");
                    report(
                        &state.args.directory,
                        JobMsg::Finished {
                            job_id: assignment.job_id,
                            trainer: state.args.name.clone(),
                            attempt: assignment.attempt,
                            result: RunResult::Refused {
                                reason: format!(
                                    "trainer {} is busy with job {} (attempt {})",
                                    state.args.name, r.job_id, r.attempt
                                ),
                            },
                        },
                    );
                    return Ok(());
                }
                let running = Running {
                    job_id: assignment.job_id.clone(),
                    attempt: assignment.attempt,
                    cancel: Arc::new(AtomicBool::new(false)),
                    checkpoint: Arc::new(AtomicBool::new(false)),
                    stale: Arc::new(AtomicBool::new(false)),
                };
                let flags = Flags {
                    cancel: running.cancel.clone(),
                    checkpoint: running.checkpoint.clone(),
                    stale: running.stale.clone(),
                };
                state.running = Some(running);
                let args = state.args.clone();
                std::thread::Builder::new()
                    .name(format!("tessera-{}", args.name))
                    .spawn(move || run_job(args, *assignment, flags, myself))?;
            }
            TrainerMsg::Cancel { job_id, checkpoint } => {
                if let Some(r) = state.running.as_ref().filter(|r| r.job_id == job_id) {
                    if !r.stale.load(Ordering::Relaxed) {
                        r.checkpoint.store(checkpoint, Ordering::Relaxed);
                    }
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
            TrainerMsg::Fence { job_id, attempt } => {
                if let Some(r) = state
                    .running
                    .as_ref()
                    .filter(|r| r.job_id == job_id && r.attempt <= attempt)
                {
                    tracing::warn!(trainer = %state.args.name, job = %job_id, attempt = r.attempt, "attempt is stale: stopping without writing");
                    r.fence();
                }
            }
            TrainerMsg::Current(reply) => {
                let _ = reply.send(
                    state
                        .running
                        .as_ref()
                        .map(|r| (r.job_id.clone(), r.attempt)),
                );
            }
            TrainerMsg::Done { job_id, attempt } => {
                if state
                    .running
                    .as_ref()
                    .is_some_and(|r| r.job_id == job_id && r.attempt == attempt)
                {
                    state.running = None;
                }
            }
        }
        Ok(())
    }
}

fn report(directory: &Directory, msg: JobMsg) {
    if let Err(e) = directory.report(msg) {
        tracing::error!(error = %e, "a job report was lost");
    }
}

/// The flags a running attempt's thread reads between steps.
struct Flags {
    cancel: Arc<AtomicBool>,
    checkpoint: Arc<AtomicBool>,
    stale: Arc<AtomicBool>,
}

/// The job's thread: load the base model, train, report.
fn run_job(args: TrainerArgs, assignment: Assignment, flags: Flags, trainer: ActorRef<TrainerMsg>) {
    let job_id = assignment.job_id.clone();
    let attempt = assignment.attempt;
    // Every line of this run (the training loop's too) carries the job's id, on whichever node.
    let span = tracing::info_span!("job", job_id = %job_id, attempt, trainer = %args.name);
    let _entered = span.enter();
    // This thread's own pool (OpenMP's thread count is per calling thread).
    if let Some(n) = args.threads {
        tch::set_num_threads(n.max(1) as i32);
    }
    tracing::info!(trainer = %args.name, job = %job_id, attempt, resume = assignment.resume, threads = ?args.threads, "job started");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(&args, &assignment, &flags)
    }))
    .unwrap_or_else(|panic| {
        let what = tessera_engine::engine::panic_message(panic.as_ref());
        RunResult::Failed {
            error: format!("the trainer panicked: {what}"),
        }
    });
    match &outcome {
        RunResult::Failed { error } => {
            tracing::warn!(trainer = %args.name, job = %job_id, attempt, %error, "job failed")
        }
        RunResult::Refused { reason } => {
            tracing::warn!(trainer = %args.name, job = %job_id, attempt, %reason, "job stopped")
        }
        other => {
            tracing::info!(trainer = %args.name, job = %job_id, outcome = ?std::mem::discriminant(other), "job ended")
        }
    }
    let _ = trainer.cast(TrainerMsg::Done {
        job_id: job_id.clone(),
        attempt,
    });
    report(
        &args.directory,
        JobMsg::Finished {
            job_id,
            trainer: args.name.clone(),
            attempt,
            result: outcome,
        },
    );
}

fn execute(args: &TrainerArgs, assignment: &Assignment, flags: &Flags) -> RunResult {
    let _guard = tch::no_grad_guard();
    let model_path = assignment
        .job
        .base_model
        .clone()
        .unwrap_or_else(|| args.default_model.clone());
    let packed_base = assignment.job.hyperparameters.base_quantization == BaseQuantization::Packed;
    let loaded = match tessera_engine::loader::load_for_training(
        &model_path,
        args.device,
        args.kind,
        packed_base,
    ) {
        Ok(l) => l,
        Err(e) => {
            return RunResult::Failed {
                error: format!("base_model: loading {}: {e}", model_path.display()),
            }
        }
    };
    drop(_guard);
    let options = TrainOptions {
        resume: assignment.resume,
        cancel: flags.cancel.clone(),
        base_model_name: model_path.display().to_string(),
        checkpoint_on_cancel: flags.checkpoint.clone(),
        attempt: assignment.attempt,
        stale: flags.stale.clone(),
        max_dataset_bytes: Some(args.max_dataset_bytes),
    };
    let job_id = assignment.job_id.clone();
    let attempt = assignment.attempt;
    let result = train(
        &loaded.model,
        &loaded.tokenizer,
        &assignment.job,
        &options,
        |p| {
            report(
                &args.directory,
                JobMsg::Progress {
                    job_id: job_id.clone(),
                    trainer: args.name.clone(),
                    attempt,
                    point: ProgressPoint::from_progress(p, now_s()),
                },
            )
        },
    );
    match result {
        Ok(TrainOutcome::Completed(summary)) => RunResult::Succeeded {
            summary: serde_json::to_value(&*summary).unwrap_or_default(),
        },
        Ok(TrainOutcome::Cancelled { step, .. }) => RunResult::Stopped { step },
        // The manager ignores a stale attempt's result; say what happened all the same.
        Err(e @ TrainError::Superseded { .. }) => RunResult::Refused {
            reason: e.to_string(),
        },
        Err(e) => RunResult::Failed {
            error: e.to_string(),
        },
    }
}
