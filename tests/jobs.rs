//! The job manager and a real trainer actor (tiny model, CPU), without HTTP: a trainer busy with a
//! job the manager does not know of (a worker that re-registers while its evicted job still runs)
//! refuses assignments without an assign-refuse loop, its stale job is fenced (stopped without
//! writing) as soon as it reports, and reports of a stale attempt never change a job.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use serde_json::json;
use tessera_actors::directory::{Directory, TrainerEntry};
use tessera_actors::jobs::{
    Assignment, JobManager, JobManagerArgs, JobMsg, JobRecord, JobSpec, JobState, Priority,
    RunResult,
};
use tessera_actors::trainer::{LocalTrainer, TrainerActor, TrainerArgs, TrainerMsg};
use tessera_engine::train::{Hyperparameters, TrainJob};

fn hyperparameters(epochs: usize) -> Hyperparameters {
    let mut h = support::quick_hyperparameters(epochs);
    h["save_every_steps"] = json!(4);
    Hyperparameters::from_json(h).unwrap()
}

fn train_job(dir: &Path, out: &str, epochs: usize) -> TrainJob {
    TrainJob {
        dataset_path: dir.join("d.jsonl"),
        output_path: dir.join(out),
        base_model: None,
        hyperparameters: hyperparameters(epochs),
    }
}

/// A job whose steps take a while (twenty micro-batches each).
fn slow_job(dir: &Path, out: &str) -> TrainJob {
    let lines: Vec<String> = (0..80)
        .map(|i| json!({"text": format!("slow line {i} with words {}", i * 7)}).to_string())
        .collect();
    std::fs::write(dir.join("slow.jsonl"), lines.join("\n")).unwrap();
    let mut h = support::quick_hyperparameters(50);
    h["gradient_accumulation_steps"] = json!(20);
    TrainJob {
        dataset_path: dir.join("slow.jsonl"),
        output_path: dir.join(out),
        base_model: None,
        hyperparameters: Hyperparameters::from_json(h).unwrap(),
    }
}

async fn get(jm: &ActorRef<JobMsg>, id: &str) -> JobRecord {
    ractor::call!(jm, JobMsg::Get, id.to_string())
        .unwrap()
        .unwrap()
}

/// Polls `cond` (an expression that may `.await`) until it holds; panics after `timeout`.
macro_rules! wait_for {
    ($what:expr, $timeout:expr, $cond:expr) => {{
        let t0 = Instant::now();
        while !$cond {
            assert!(t0.elapsed() < $timeout, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

#[test]
fn a_busy_trainer_does_not_spin_its_stale_job_is_fenced_and_stale_reports_are_ignored() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let model: PathBuf = support::tiny::write_model(&dir.path().join("model"), 5);
        let lines: Vec<String> = (0..16)
            .map(|i| json!({"text": format!("line {i} of the data {}", i * 3)}).to_string())
            .collect();
        std::fs::write(dir.path().join("d.jsonl"), lines.join("\n")).unwrap();

        let directory = Directory::default();
        let (trainer, _) = Actor::spawn(
            None,
            TrainerActor,
            TrainerArgs {
                name: "trainer-0".into(),
                node: "test".into(),
                device: tch::Device::Cpu,
                kind: Some(tch::Kind::Float),
                default_model: model,
                directory: directory.clone(),
                tags: Default::default(),
                threads: None,
                max_dataset_bytes: 1 << 30,
            },
        )
        .await
        .unwrap();
        let (jm, _) = Actor::spawn(
            None,
            JobManager,
            JobManagerArgs {
                db_path: dir.path().join("jobs.sqlite"),
                directory: directory.clone(),
                node: "test".into(),
                max_attempts: 3,
                max_queued: 100,
            },
        )
        .await
        .unwrap();
        directory.set_job_manager(Some(jm.clone()));

        // The trainer runs a job the manager never gave it (attempt 1 of a job since re-queued).
        // Its first step takes long enough for the manager to offer it a job meanwhile.
        let orphan = slow_job(dir.path(), "orphan");
        trainer
            .cast(TrainerMsg::Run(Box::new(Assignment {
                job_id: "ft-orphan".into(),
                attempt: 1,
                job: orphan.clone(),
                resume: false,
            })))
            .unwrap();
        wait_for!(
            "the orphan to run",
            Duration::from_secs(30),
            ractor::call!(trainer, TrainerMsg::Current)
                .unwrap()
                .is_some()
        );

        // The manager learns of the trainer only now, and believes it idle.
        let spec = JobSpec {
            train: train_job(dir.path(), "real", 40),
            priority: Priority::Normal,
            tags: Default::default(),
        };
        let id = ractor::call!(jm, JobMsg::Submit, spec).unwrap().unwrap().id;
        directory.set_trainer(
            "trainer-0",
            Some(TrainerEntry {
                actor: std::sync::Arc::new(LocalTrainer(trainer.clone())),
                local: true,
                node: "test".into(),
                device: "Cpu".into(),
                tags: Default::default(),
            }),
        );
        jm.cast(JobMsg::TrainersChanged).unwrap();

        // Refused: the job waits; the trainer is not offered it again at once (no loop).
        wait_for!("a refusal", Duration::from_secs(10), {
            let r = get(&jm, &id).await;
            r.attempts >= 1 && r.status == JobState::Queued
        });
        let refused_at = Instant::now();
        // The orphan's next progress report is stale: its trainer stops it without writing.
        wait_for!(
            "the orphan to stop",
            Duration::from_secs(180),
            ractor::call!(trainer, TrainerMsg::Current)
                .unwrap()
                .is_none_or(|(job, _)| job != "ft-orphan")
        );
        assert!(
            !orphan
                .output_path
                .join("adapter_model.safetensors")
                .exists(),
            "a fenced attempt writes no adapter"
        );

        // After the refusal's backoff the job runs; its attempt number is the fencing token.
        wait_for!(
            "the job to run",
            Duration::from_secs(30),
            get(&jm, &id).await.status == JobState::Running
        );
        let running = get(&jm, &id).await;
        // One offer per refusal backoff (2 s) while the orphan ran, not thousands.
        let bound = 2 + refused_at.elapsed().as_secs() / 2 + 1;
        assert!(
            running.attempts as u64 <= bound,
            "no assign-refuse loop: {} attempts in {:?}",
            running.attempts,
            refused_at.elapsed()
        );
        // A result of an older attempt changes nothing.
        jm.cast(JobMsg::Finished {
            job_id: id.clone(),
            trainer: "trainer-0".into(),
            attempt: running.attempts - 1,
            result: RunResult::Failed {
                error: "from a stale attempt".into(),
            },
        })
        .unwrap();
        wait_for!(
            "the job to end",
            Duration::from_secs(120),
            get(&jm, &id).await.status.is_final()
        );
        let done = get(&jm, &id).await;
        assert_eq!(done.status, JobState::Succeeded, "{done:?}");
        assert_eq!(done.error, None);
        assert_eq!(done.attempts, running.attempts);
        assert_eq!(done.interruptions, 0);
    });
}
