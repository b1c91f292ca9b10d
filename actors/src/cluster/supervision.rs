//! Supervision of a node's cluster actors (the node server, the head's `ClusterHead` and
//! `HeadPort`, a worker's agent). They are one unit: each holds the others' references and the
//! sessions' state, so one cannot be restarted alone. Their supervisor therefore escalates (the
//! Erlang `one_for_all` whose restart belongs to the process manager): when one fails or stops
//! unasked, it is marked `failed` on the node's health board with the cause (so the head's
//! `/health` answers 503 and a liveness probe restarts the process), the error is logged, and
//! `escalations` yields its name (a worker exits non-zero on it, and its service manager
//! restarts it, as it would after a crash). While they run, `/health` lists them as `running`
//! with role `cluster`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

use crate::health::{ActorState, HealthBoard};
use crate::supervisor::went_down;

/// The health board's role of cluster actors.
pub const ROLE: &str = "cluster";

pub enum WatchMsg {
    /// A stop that was asked for: later terminations are not failures.
    Stopping,
}

impl ractor::Message for WatchMsg {}

type Names = Arc<Mutex<HashMap<ActorId, String>>>;

struct ClusterSupervisor;

struct WatchArgs {
    names: Names,
    health: HealthBoard,
    escalate: mpsc::UnboundedSender<String>,
}

struct WatchState {
    args: WatchArgs,
    stopping: bool,
}

impl Actor for ClusterSupervisor {
    type Msg = WatchMsg;
    type State = WatchState;
    type Arguments = WatchArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WatchMsg>,
        args: WatchArgs,
    ) -> Result<WatchState, ActorProcessingErr> {
        Ok(WatchState {
            args,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WatchMsg>,
        msg: WatchMsg,
        state: &mut WatchState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WatchMsg::Stopping => state.stopping = true,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<WatchMsg>,
        event: SupervisionEvent,
        state: &mut WatchState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, cause)) = went_down(event) else {
            return Ok(());
        };
        let name = {
            let names = state.args.names.lock().expect("cluster names");
            names
                .get(&cell.get_id())
                .cloned()
                .unwrap_or_else(|| format!("cluster actor {}", cell.get_id()))
        };
        if state.stopping {
            state
                .args
                .health
                .set(&name, ROLE, ActorState::Stopped, None);
            return Ok(());
        }
        tracing::error!(actor = %name, cause = %cause, "cluster actor down; the cluster endpoint is broken and the node must be restarted");
        state
            .args
            .health
            .set(&name, ROLE, ActorState::Failed, Some(cause));
        let _ = state.args.escalate.send(name);
        Ok(())
    }
}

/// A running cluster supervisor.
#[derive(Clone)]
pub struct ClusterWatch {
    actor: ActorRef<WatchMsg>,
    names: Names,
    health: HealthBoard,
}

impl ClusterWatch {
    /// Starts the supervisor; the receiver yields the name of each actor that went down unasked.
    pub async fn start(
        health: HealthBoard,
    ) -> Result<(Self, mpsc::UnboundedReceiver<String>), String> {
        let names = Names::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(
            None,
            ClusterSupervisor,
            WatchArgs {
                names: names.clone(),
                health: health.clone(),
                escalate: tx,
            },
        )
        .await
        .map_err(|e| format!("cluster supervisor: {e}"))?;
        Ok((
            Self {
                actor,
                names,
                health,
            },
            rx,
        ))
    }

    /// Supervises `cell` under `name` from now on.
    pub fn adopt(&self, name: &str, cell: ActorCell) {
        self.names
            .lock()
            .expect("cluster names")
            .insert(cell.get_id(), name.to_string());
        self.health.set(name, ROLE, ActorState::Running, None);
        cell.link(self.actor.get_cell());
    }

    /// Says that the actors are being stopped on purpose (shutdown).
    pub fn stopping(&self) {
        let _ = self.actor.cast(WatchMsg::Stopping);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Fragile;

    impl Actor for Fragile {
        type Msg = bool;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<bool>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<bool>,
            fail: bool,
            _state: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            if fail {
                return Err("a peer sent something it should not have".into());
            }
            Ok(())
        }
    }

    async fn wait_for(health: &HealthBoard, name: &str, state: ActorState) {
        for _ in 0..200 {
            if health.state(name) == Some(state) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} never became {state:?}: {:?}", health.snapshot());
    }

    #[tokio::test]
    async fn a_failed_cluster_actor_is_reported_and_escalated() {
        let health = HealthBoard::default();
        let (watch, mut escalations) = ClusterWatch::start(health.clone()).await.unwrap();
        let (a, _) = Actor::spawn(None, Fragile, ()).await.unwrap();
        let (b, _) = Actor::spawn(None, Fragile, ()).await.unwrap();
        watch.adopt("cluster-a", a.get_cell());
        watch.adopt("cluster-b", b.get_cell());
        assert_eq!(health.state("cluster-a"), Some(ActorState::Running));
        a.cast(false).unwrap();
        a.cast(true).unwrap();
        wait_for(&health, "cluster-a", ActorState::Failed).await;
        let entry = health
            .snapshot()
            .into_iter()
            .find(|h| h.name == "cluster-a")
            .unwrap();
        assert_eq!(entry.role, ROLE);
        assert!(entry
            .last_error
            .unwrap()
            .contains("a peer sent something it should not have"));
        assert!(health.escalated());
        assert_eq!(escalations.recv().await.as_deref(), Some("cluster-a"));
        // The other stays up; a stop that was asked for is no failure.
        assert_eq!(health.state("cluster-b"), Some(ActorState::Running));
        watch.stopping();
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.stop(None);
        wait_for(&health, "cluster-b", ActorState::Stopped).await;
        assert!(escalations.try_recv().is_err());
    }
}
