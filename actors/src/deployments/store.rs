//! The `deployments` table, in the head's SQLite database beside the jobs: one row per deployment
//! created at runtime (its spec as JSON), so a restarted head deploys them again. The default
//! deployment is not stored: it comes from the configuration at every start.

use std::path::Path;

use rusqlite::{params, Connection};

use super::{DeploymentError, DeploymentSpec};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL
);
";

pub struct DeploymentStore {
    conn: Connection,
}

fn store_err(e: impl std::fmt::Display) -> DeploymentError {
    DeploymentError::Store(e.to_string())
}

impl DeploymentStore {
    /// Opens (creating if needed) the table in the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DeploymentError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| store_err(format!("{}: {e}", dir.display())))?;
        }
        let conn =
            Connection::open(path).map_err(|e| store_err(format!("{}: {e}", path.display())))?;
        // The job manager holds the same file: wait for its write lock rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(store_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(store_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(store_err)?;
        conn.execute_batch(SCHEMA).map_err(store_err)?;
        Ok(Self { conn })
    }

    pub fn insert(&self, spec: &DeploymentSpec, created_at: f64) -> Result<(), DeploymentError> {
        let json = serde_json::to_string(spec).map_err(store_err)?;
        self.conn
            .execute(
                "INSERT INTO deployments (name, spec, created_at) VALUES (?1, ?2, ?3)",
                params![spec.name, json, created_at],
            )
            .map_err(store_err)?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), DeploymentError> {
        self.conn
            .execute("DELETE FROM deployments WHERE name = ?1", params![name])
            .map_err(store_err)?;
        Ok(())
    }

    /// Every stored deployment, oldest first: (spec, created_at). A row that no longer decodes
    /// (written by another version) is skipped with a warning.
    pub fn all(&self) -> Result<Vec<(DeploymentSpec, f64)>, DeploymentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, spec, created_at FROM deployments ORDER BY created_at, name")
            .map_err(store_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .map_err(store_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, json, created)| match serde_json::from_str(&json) {
                Ok(spec) => Some((spec, created)),
                Err(e) => {
                    tracing::warn!(deployment = %name, error = %e, "a stored deployment does not decode; skipped");
                    None
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployments::{Dtype, PlacementSpec};

    fn spec(name: &str) -> DeploymentSpec {
        DeploymentSpec {
            name: name.into(),
            path: "/models/m.gguf".into(),
            replicas: 1,
            min_replicas: 1,
            max_replicas: 1,
            tensor_parallel: None,
            dtype: Dtype::Bf16,
            placement: PlacementSpec::default(),
            autoscaling: None,
        }
    }

    #[test]
    fn deployments_survive_a_reopen_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        {
            let store = DeploymentStore::open(&db).unwrap();
            store.insert(&spec("b"), 2.0).unwrap();
            store.insert(&spec("a"), 1.0).unwrap();
            store.insert(&spec("c"), 3.0).unwrap();
            assert!(store.insert(&spec("a"), 4.0).is_err(), "names are unique");
            store.delete("c").unwrap();
        }
        let store = DeploymentStore::open(&db).unwrap();
        let all = store.all().unwrap();
        let names: Vec<_> = all.iter().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(all[0].0, spec("a"));
    }
}
