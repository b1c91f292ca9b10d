//! The health board: every supervised actor's state, restarts and last failure, shared by the
//! supervisor (writer) and `/health` (reader).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorState {
    Starting,
    Running,
    /// Failed; a restart is scheduled after a backoff.
    Restarting,
    /// Failed more often than the restart policy allows: escalated, not restarted.
    Failed,
    /// Takes no new work and stops once its work is done (a replica scaled down).
    Draining,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorHealth {
    pub name: String,
    pub role: String,
    pub state: ActorState,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch of the latest state change.
    pub since: f64,
}

/// A cheap, cloneable view of every actor's health.
#[derive(Debug, Clone, Default)]
pub struct HealthBoard {
    inner: Arc<RwLock<BTreeMap<String, ActorHealth>>>,
}

pub(crate) fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl HealthBoard {
    pub fn set(&self, name: &str, role: &str, state: ActorState, error: Option<String>) {
        let mut map = self.inner.write().expect("health board");
        let entry = map.entry(name.to_string()).or_insert_with(|| ActorHealth {
            name: name.to_string(),
            role: role.to_string(),
            state,
            restarts: 0,
            last_error: None,
            since: now_s(),
        });
        if state == ActorState::Restarting {
            entry.restarts += 1;
        }
        if error.is_some() {
            entry.last_error = error;
        }
        entry.state = state;
        entry.since = now_s();
    }

    pub fn snapshot(&self) -> Vec<ActorHealth> {
        self.inner
            .read()
            .expect("health board")
            .values()
            .cloned()
            .collect()
    }

    pub fn state(&self, name: &str) -> Option<ActorState> {
        self.inner
            .read()
            .expect("health board")
            .get(name)
            .map(|h| h.state)
    }

    /// True when some actor failed beyond its restart policy.
    pub fn escalated(&self) -> bool {
        self.snapshot()
            .iter()
            .any(|h| h.state == ActorState::Failed)
    }
}
