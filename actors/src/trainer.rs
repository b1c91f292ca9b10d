//! The trainer actor: one per training device (group). It runs one job at a time on its own OS
//! thread (tch calls block), forwards every step's progress and the outcome to the job manager,
//! and honours cancel between steps (checkpointing first when the head shuts down).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tessera_engine::train::hyperparams::TrainJob;
use tessera_engine::train::trainer::{train, TrainOptions, TrainOutcome};

use crate::directory::Directory;
use crate::health::now_s;
use crate::jobs::{JobMsg, ProgressPoint, RunResult};

/// A job handed to a trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: String,
    pub job: TrainJob,
    /// Continue from the latest checkpoint under the output path (a re-queued job).
    pub resume: bool,
}

pub enum TrainerMsg {
    Run(Box<Assignment>),
    /// Stop the job after its current step; `checkpoint` saves the steps done first.
    Cancel {
        job_id: String,
        checkpoint: bool,
    },
    /// The job it is running, if any.
    Current(RpcReplyPort<Option<String>>),
    /// From its own thread: the job is over.
    Done {
        job_id: String,
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
}

struct Running {
    job_id: String,
    cancel: Arc<AtomicBool>,
    checkpoint: Arc<AtomicBool>,
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
                    // The manager thinks we are idle: tell it this job did not start.
                    tracing::warn!(trainer = %state.args.name, busy_with = %r.job_id, job = %assignment.job_id, "trainer busy; job refused");
                    report(
                        &state.args.directory,
                        JobMsg::Finished {
                            job_id: assignment.job_id,
                            trainer: state.args.name.clone(),
                            result: RunResult::Stopped { step: 0 },
                        },
                    );
                    return Ok(());
                }
                let cancel = Arc::new(AtomicBool::new(false));
                let checkpoint = Arc::new(AtomicBool::new(false));
                state.running = Some(Running {
                    job_id: assignment.job_id.clone(),
                    cancel: cancel.clone(),
                    checkpoint: checkpoint.clone(),
                });
                let args = state.args.clone();
                std::thread::Builder::new()
                    .name(format!("tessera-{}", args.name))
                    .spawn(move || run_job(args, *assignment, cancel, checkpoint, myself))?;
            }
            TrainerMsg::Cancel { job_id, checkpoint } => {
                if let Some(r) = state.running.as_ref().filter(|r| r.job_id == job_id) {
                    r.checkpoint.store(checkpoint, Ordering::Relaxed);
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
            TrainerMsg::Current(reply) => {
                let _ = reply.send(state.running.as_ref().map(|r| r.job_id.clone()));
            }
            TrainerMsg::Done { job_id } => {
                if state.running.as_ref().is_some_and(|r| r.job_id == job_id) {
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

/// The job's thread: load the base model, train, report.
fn run_job(
    args: TrainerArgs,
    assignment: Assignment,
    cancel: Arc<AtomicBool>,
    checkpoint: Arc<AtomicBool>,
    trainer: ActorRef<TrainerMsg>,
) {
    let job_id = assignment.job_id.clone();
    tracing::info!(trainer = %args.name, job = %job_id, resume = assignment.resume, "job started");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(&args, &assignment, &cancel, &checkpoint)
    }))
    .unwrap_or_else(|panic| {
        let what = tessera_engine::engine::panic_message(panic.as_ref());
        RunResult::Failed {
            error: format!("the trainer panicked: {what}"),
        }
    });
    match &outcome {
        RunResult::Failed { error } => {
            tracing::warn!(trainer = %args.name, job = %job_id, %error, "job failed")
        }
        other => {
            tracing::info!(trainer = %args.name, job = %job_id, outcome = ?std::mem::discriminant(other), "job ended")
        }
    }
    let _ = trainer.cast(TrainerMsg::Done {
        job_id: job_id.clone(),
    });
    report(
        &args.directory,
        JobMsg::Finished {
            job_id,
            trainer: args.name.clone(),
            result: outcome,
        },
    );
}

fn execute(
    args: &TrainerArgs,
    assignment: &Assignment,
    cancel: &Arc<AtomicBool>,
    checkpoint: &Arc<AtomicBool>,
) -> RunResult {
    let _guard = tch::no_grad_guard();
    let model_path = assignment
        .job
        .base_model
        .clone()
        .unwrap_or_else(|| args.default_model.clone());
    let loaded = match tessera_engine::load(&model_path, &[args.device], args.kind) {
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
        cancel: cancel.clone(),
        base_model_name: model_path.display().to_string(),
        checkpoint_on_cancel: checkpoint.clone(),
    };
    let job_id = assignment.job_id.clone();
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
        Err(e) => RunResult::Failed {
            error: e.to_string(),
        },
    }
}
