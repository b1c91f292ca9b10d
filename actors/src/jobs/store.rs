//! Fine-tune jobs in an embedded SQLite database: one row per job, one row per progress point,
//! so a head that restarts (or crashes) loses no job and no history. State changes are committed
//! with `synchronous = FULL` (on the disk before the call returns); progress points with `NORMAL`.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};
use tessera_engine::train::hyperparams::TrainJob;

use super::types::{
    JobError, JobPage, JobQuery, JobRecord, JobSpec, JobState, Priority, ProgressPoint,
};
use crate::health::now_s;

pub struct JobStore {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    trainer TEXT,
    node TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    summary TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS progress (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    point TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS progress_job ON progress(job_id, step);
";

fn store_err(e: impl std::fmt::Display) -> JobError {
    JobError::Store(e.to_string())
}

impl JobStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, JobError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| store_err(format!("{}: {e}", dir.display())))?;
        }
        let conn =
            Connection::open(path).map_err(|e| store_err(format!("{}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(store_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(store_err)?;
        conn.execute_batch(SCHEMA).map_err(store_err)?;
        // Databases from before these columns existed.
        for (column, definition) in [
            ("interruptions", "INTEGER NOT NULL DEFAULT 0"),
            ("tags", "TEXT NOT NULL DEFAULT '{}'"),
        ] {
            let exists: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")
                .and_then(|mut s| s.exists([column]))
                .map_err(store_err)?;
            if !exists {
                conn.execute_batch(&format!(
                    "ALTER TABLE jobs ADD COLUMN {column} {definition}"
                ))
                .map_err(store_err)?;
            }
        }
        Ok(Self { conn })
    }

    /// Output paths of queued and running jobs: (id, state, output path).
    pub fn live_outputs(&self) -> Result<Vec<(String, JobState, std::path::PathBuf)>, JobError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, status, spec FROM jobs WHERE status IN ('queued', 'running')")
            .map_err(store_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        rows.into_iter()
            .map(|(id, status, spec)| {
                let train: TrainJob = serde_json::from_str(&spec).map_err(store_err)?;
                let status = JobState::parse(&status).unwrap_or(JobState::Queued);
                Ok((id, status, train.output_path))
            })
            .collect()
    }

    pub fn insert(&self, id: &str, spec: &JobSpec) -> Result<JobRecord, JobError> {
        let seq: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs", [], |r| {
                r.get(0)
            })
            .map_err(store_err)?;
        let spec_json = serde_json::to_string(&spec.train).map_err(store_err)?;
        let tags_json = serde_json::to_string(&spec.tags).map_err(store_err)?;
        self.durable(|conn| conn
            .execute(
                "INSERT INTO jobs (id, seq, status, priority, spec, created_at, tags) VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6)",
                params![
                    id,
                    seq,
                    spec.priority.as_str(),
                    spec_json,
                    now_s(),
                    tags_json
                ],
            ))
            .map_err(store_err)?;
        self.get(id, false)
    }

    pub fn get(&self, id: &str, with_history: bool) -> Result<JobRecord, JobError> {
        let mut record = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                row_to_record,
            )
            .optional()
            .map_err(store_err)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        record.progress = self.last_progress(id)?;
        if with_history {
            record.history = Some(self.history(id)?);
        }
        Ok(record)
    }

    pub fn spec(&self, id: &str) -> Result<JobSpec, JobError> {
        let (spec, priority, tags): (String, String, String) = self
            .conn
            .query_row(
                "SELECT spec, priority, tags FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(store_err)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        Ok(JobSpec {
            train: serde_json::from_str(&spec).map_err(store_err)?,
            priority: Priority::parse(&priority).unwrap_or_default(),
            tags: serde_json::from_str(&tags).map_err(store_err)?,
        })
    }

    pub fn list(&self, query: &JobQuery) -> Result<JobPage, JobError> {
        let status = query.status.map(|s| s.as_str().to_string());
        let total: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE ?1 IS NULL OR status = ?1",
                [&status],
                |r| r.get(0),
            )
            .map_err(store_err)?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR status = ?1 ORDER BY seq DESC LIMIT ?2 OFFSET ?3"
            ))
            .map_err(store_err)?;
        let mut jobs = stmt
            .query_map(
                params![status, query.limit as i64, query.offset as i64],
                row_to_record,
            )
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        for job in &mut jobs {
            job.progress = self.last_progress(&job.id)?;
        }
        Ok(JobPage {
            jobs,
            total: total as usize,
            limit: query.limit,
            offset: query.offset,
        })
    }

    /// Queued jobs in the order they should run: priority, then submission.
    pub fn queued(&self) -> Result<Vec<String>, JobError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY
                 CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END, seq",
            )
            .map_err(store_err)?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        Ok(ids)
    }

    pub fn with_status(&self, status: JobState) -> Result<Vec<String>, JobError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM jobs WHERE status = ?1 ORDER BY seq")
            .map_err(store_err)?;
        let ids = stmt
            .query_map([status.as_str()], |r| r.get::<_, String>(0))
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        Ok(ids)
    }

    /// Jobs in `status`.
    pub fn count(&self, status: JobState) -> Result<usize, JobError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE status = ?1",
                [status.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(store_err)
    }

    pub fn counts(&self) -> Result<Vec<(JobState, usize)>, JobError> {
        JobState::ALL
            .into_iter()
            .map(|s| self.count(s).map(|n| (s, n)))
            .collect()
    }

    /// Starts the job's next attempt on `trainer`; returns the attempt's number.
    pub fn mark_running(&self, id: &str, trainer: &str, node: &str) -> Result<u32, JobError> {
        self.exec(
            "UPDATE jobs SET status = 'running', trainer = ?2, node = ?3, attempts = attempts + 1,
             started_at = COALESCE(started_at, ?4) WHERE id = ?1",
            params![id, trainer, node, now_s()],
        )?;
        Ok(self.get(id, false)?.attempts)
    }

    /// Back to the queue (a head shutdown, a trainer that refused it): it resumes from its
    /// checkpoint.
    pub fn requeue(&self, id: &str) -> Result<(), JobError> {
        self.exec(
            "UPDATE jobs SET status = 'queued' WHERE id = ?1 AND status = 'running'",
            params![id],
        )
    }

    /// Counts an attempt that ended without an outcome and keeps why (shown as `error` while the
    /// job waits); returns the job's count of such attempts.
    pub fn interrupted(&self, id: &str, why: &str) -> Result<u32, JobError> {
        self.exec(
            "UPDATE jobs SET interruptions = interruptions + 1, error = ?2 WHERE id = ?1",
            params![id, why],
        )?;
        Ok(self.get(id, false)?.interruptions)
    }

    pub fn request_cancel(&self, id: &str) -> Result<(), JobError> {
        self.exec(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
            params![id],
        )
    }

    pub fn cancel_requested(&self, id: &str) -> Result<bool, JobError> {
        self.conn
            .query_row(
                "SELECT cancel_requested FROM jobs WHERE id = ?1",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .map_err(store_err)
    }

    pub fn finish(
        &self,
        id: &str,
        status: JobState,
        error: Option<&str>,
        summary: Option<&serde_json::Value>,
    ) -> Result<(), JobError> {
        self.exec(
            "UPDATE jobs SET status = ?2, error = ?3, summary = ?4, finished_at = ?5 WHERE id = ?1",
            params![
                id,
                status.as_str(),
                error,
                summary.map(|s| s.to_string()),
                now_s()
            ],
        )
    }

    pub fn add_progress(&self, id: &str, point: &ProgressPoint) -> Result<(), JobError> {
        // A resumed run repeats the steps after its checkpoint: keep the newest of each step.
        // Progress is frequent and can be replayed: it skips the fsync of state changes.
        // Never a non-finite value: JSON has none (serde writes `null`, which reads back as no
        // number). A trainer stops a run whose loss is not finite; an infinite eval loss (a
        // held-out token given probability 0) is stored as none.
        let mut point = point.clone();
        if point.eval_loss.is_some_and(|l| !l.is_finite()) {
            point.eval_loss = None;
        }
        if ![
            point.loss,
            point.learning_rate,
            point.tokens_per_s,
            point.at,
        ]
        .iter()
        .all(|v| v.is_finite())
        {
            tracing::warn!(
                job = id,
                step = point.step,
                loss = point.loss,
                "progress with a non-finite value not stored"
            );
            return Ok(());
        }
        let point_json = serde_json::to_string(&point).map_err(store_err)?;
        self.conn
            .execute(
                "DELETE FROM progress WHERE job_id = ?1 AND step >= ?2",
                params![id, point.step as i64],
            )
            .and_then(|_| {
                self.conn.execute(
                    "INSERT INTO progress (job_id, step, point) VALUES (?1, ?2, ?3)",
                    params![id, point.step as i64, point_json],
                )
            })
            .map(|_| ())
            .map_err(store_err)
    }

    pub fn history(&self, id: &str) -> Result<Vec<ProgressPoint>, JobError> {
        let mut stmt = self
            .conn
            .prepare("SELECT point FROM progress WHERE job_id = ?1 ORDER BY step")
            .map_err(store_err)?;
        let rows = stmt
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        Ok(rows.iter().filter_map(|p| parse_point(id, p)).collect())
    }

    /// The newest progress point that reads back.
    fn last_progress(&self, id: &str) -> Result<Option<ProgressPoint>, JobError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT point FROM progress WHERE job_id = ?1 ORDER BY step DESC")
            .map_err(store_err)?;
        let mut rows = stmt.query([id]).map_err(store_err)?;
        while let Some(row) = rows.next().map_err(store_err)? {
            let point: String = row.get(0).map_err(store_err)?;
            if let Some(point) = parse_point(id, &point) {
                return Ok(Some(point));
            }
        }
        Ok(None)
    }

    /// A state change: committed with `synchronous = FULL`.
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<(), JobError> {
        self.durable(|conn| conn.execute(sql, params))
            .map(|_| ())
            .map_err(store_err)
    }

    /// Runs `f` with `synchronous = FULL`, then back to `NORMAL`.
    fn durable<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let result = f(&self.conn);
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        result
    }

    /// The connection's `synchronous` setting (1 = NORMAL, 2 = FULL), and the one a state change
    /// runs with.
    pub fn synchronous_levels(&self) -> Result<(i64, i64), JobError> {
        let get = |c: &Connection| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0));
        let normal = get(&self.conn).map_err(store_err)?;
        let full = self.durable(get).map_err(store_err)?;
        Ok((normal, full))
    }
}

/// A stored progress point, or `None` (logged) for one that does not read back: earlier versions
/// stored a diverged run's NaN loss as `null`, and one bad row must not fail every listing,
/// the job's cancel, or the job manager's start.
fn parse_point(id: &str, point: &str) -> Option<ProgressPoint> {
    match serde_json::from_str(point) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(job = id, error = %e, "a stored progress point does not read back; skipped");
            None
        }
    }
}

const COLUMNS: &str = "id, status, priority, spec, created_at, started_at, finished_at, trainer, node, attempts, error, summary, interruptions, tags";

fn row_to_record(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let status: String = r.get(1)?;
    let priority: String = r.get(2)?;
    let spec: String = r.get(3)?;
    let train: TrainJob = serde_json::from_str(&spec).map_err(|e| bad(3, e.to_string()))?;
    let summary: Option<String> = r.get(11)?;
    let summary: Option<serde_json::Value> = summary
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| bad(11, e.to_string()))?;
    let status = JobState::parse(&status).ok_or_else(|| bad(1, format!("status `{status}`")))?;
    let tags: String = r.get(13)?;
    let tags = serde_json::from_str(&tags).map_err(|e| bad(13, e.to_string()))?;
    Ok(JobRecord {
        id: r.get(0)?,
        status,
        priority: Priority::parse(&priority).unwrap_or_default(),
        adapter_path: (status == JobState::Succeeded).then(|| train.output_path.clone()),
        dataset_path: train.dataset_path,
        output_path: train.output_path,
        base_model: train.base_model,
        hyperparameters: serde_json::to_value(&train.hyperparameters).unwrap_or_default(),
        created_at: r.get(4)?,
        started_at: r.get(5)?,
        finished_at: r.get(6)?,
        trainer: r.get(7)?,
        node: r.get(8)?,
        attempts: r.get::<_, i64>(9)? as u32,
        interruptions: r.get::<_, i64>(12)? as u32,
        progress: None,
        error: r.get(10)?,
        summary,
        history: None,
        tags,
        pending_reason: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_engine::train::hyperparams::Hyperparameters;

    fn spec(priority: Priority) -> JobSpec {
        JobSpec {
            train: TrainJob {
                dataset_path: "/data/d.jsonl".into(),
                output_path: "/out/a".into(),
                base_model: None,
                hyperparameters: Hyperparameters::default(),
            },
            priority,
            tags: Default::default(),
        }
    }

    fn point(step: usize, loss: f64) -> ProgressPoint {
        ProgressPoint {
            step,
            total_steps: 10,
            epoch: 1,
            loss,
            learning_rate: 1e-4,
            tokens_per_s: 100.0,
            eval_loss: None,
            at: 0.0,
        }
    }

    #[test]
    fn non_finite_progress_is_never_stored_and_old_null_rows_read_leniently() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        store.insert("a", &spec(Priority::Normal)).unwrap();
        store.add_progress("a", &point(1, 2.0)).unwrap();
        store.add_progress("a", &point(2, f64::NAN)).unwrap();
        store.add_progress("a", &point(3, f64::INFINITY)).unwrap();
        let infinite_eval = ProgressPoint {
            eval_loss: Some(f64::INFINITY),
            ..point(4, 1.0)
        };
        store.add_progress("a", &infinite_eval).unwrap();
        let history = store.get("a", true).unwrap().history.unwrap();
        assert_eq!(
            history.iter().map(|p| p.step).collect::<Vec<_>>(),
            [1, 4],
            "{history:?}"
        );
        assert_eq!(history[1].eval_loss, None);
        // A row as earlier versions wrote a NaN loss: `null`, which is no f64.
        let old = serde_json::to_string(&point(5, f64::NAN)).unwrap();
        assert!(old.contains("\"loss\":null"), "{old}");
        store
            .conn
            .execute(
                "INSERT INTO progress (job_id, step, point) VALUES ('a', 5, ?1)",
                [&old],
            )
            .unwrap();
        let record = store.get("a", true).unwrap();
        assert_eq!(
            record.progress.unwrap().step,
            4,
            "the newest point that reads"
        );
        assert_eq!(record.history.unwrap().len(), 2);
        let page = store
            .list(&JobQuery {
                limit: 10,
                ..JobQuery::default()
            })
            .unwrap();
        assert_eq!(page.jobs[0].progress.as_ref().unwrap().step, 4);
    }

    #[test]
    fn jobs_and_history_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        {
            let store = JobStore::open(&path).unwrap();
            store.insert("a", &spec(Priority::Normal)).unwrap();
            assert_eq!(store.mark_running("a", "trainer-0", "head").unwrap(), 1);
            store.add_progress("a", &point(1, 2.0)).unwrap();
            store.add_progress("a", &point(2, 1.5)).unwrap();
        }
        let store = JobStore::open(&path).unwrap();
        let a = store.get("a", true).unwrap();
        assert_eq!(a.status, JobState::Running);
        assert_eq!(a.attempts, 1);
        assert_eq!(a.progress.as_ref().unwrap().step, 2);
        assert_eq!(a.history.as_ref().unwrap().len(), 2);
        // A resume from step 1 replaces the points after it.
        store.add_progress("a", &point(2, 1.4)).unwrap();
        let h = store.history("a").unwrap();
        assert_eq!(h.iter().map(|p| p.loss).collect::<Vec<_>>(), vec![2.0, 1.4]);
        assert!(matches!(store.get("zz", false), Err(JobError::NotFound(_))));
    }

    #[test]
    fn queue_order_is_priority_then_fifo_and_lists_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("j.sqlite")).unwrap();
        for (id, p) in [
            ("l1", Priority::Low),
            ("n1", Priority::Normal),
            ("h1", Priority::High),
            ("n2", Priority::Normal),
            ("h2", Priority::High),
        ] {
            store.insert(id, &spec(p)).unwrap();
        }
        assert_eq!(store.queued().unwrap(), vec!["h1", "h2", "n1", "n2", "l1"]);
        store
            .finish("n1", JobState::Failed, Some("boom"), None)
            .unwrap();
        let page = store
            .list(&JobQuery {
                status: Some(JobState::Queued),
                limit: 2,
                offset: 1,
            })
            .unwrap();
        assert_eq!(page.total, 4);
        let ids: Vec<_> = page.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, vec!["n2", "h1"], "newest first, second page");
        let failed = store.get("n1", false).unwrap();
        assert_eq!(failed.error.as_deref(), Some("boom"));
        let counts = store.counts().unwrap();
        assert!(counts.contains(&(JobState::Queued, 4)));
    }

    #[test]
    fn state_changes_are_synchronous_full_and_interruptions_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("j.sqlite")).unwrap();
        assert_eq!(store.synchronous_levels().unwrap(), (1, 2));
        store.insert("a", &spec(Priority::Normal)).unwrap();
        assert_eq!(store.mark_running("a", "t", "head").unwrap(), 1);
        assert_eq!(store.interrupted("a", "the head stopped").unwrap(), 1);
        store.requeue("a").unwrap();
        assert_eq!(store.mark_running("a", "t", "head").unwrap(), 2);
        let a = store.get("a", false).unwrap();
        assert_eq!((a.attempts, a.interruptions), (2, 1));
        assert_eq!(a.error.as_deref(), Some("the head stopped"));
        let live = store.live_outputs().unwrap();
        assert_eq!(live, vec![("a".into(), JobState::Running, "/out/a".into())]);
    }
}
