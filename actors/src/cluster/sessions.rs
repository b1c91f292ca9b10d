//! Who speaks for which node on the head. Messages that arrive through ractor_cluster carry no
//! sender, so each authenticated session gets a random key, sent only to the agent of the node
//! that session authenticated as (the pg member whose actor id is on that session); every frame
//! must carry its node's key. Also: the exported `HeadPort` actor (decodes frames; undecodable
//! ones are logged and dropped, never a panic) and the node server's session events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::NodeEventSubscription;

use super::gate::Conns;
use super::head_msg::HeadMsg;
use super::wire::{worker_group, HeadInbox, WorkerInbox, HEAD_GROUP};

/// Authenticated sessions and the keys handed to them.
#[derive(Default)]
pub struct Sessions {
    /// Authenticated session id → the node name its peer gave.
    up: HashMap<u64, String>,
    /// Node → (its session, its key).
    keys: HashMap<String, (u64, String)>,
}

/// `node`'s agent as seen through session `session` (not a same-named actor on another one).
fn agent_on(node: &str, session: u64) -> Option<ActorRef<WorkerInbox>> {
    ractor::pg::get_members(&worker_group(node))
        .into_iter()
        .find(|c| matches!(c.get_id(), ActorId::Remote { node_id, .. } if node_id == session))
        .map(ActorRef::from)
}

/// Compares in time independent of where the keys differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    pub fn up(&mut self, id: u64, peer: String) {
        self.up.insert(id, peer);
    }

    /// Forgets session `id`; returns the node it spoke for, if it was that node's current one.
    pub fn closed(&mut self, id: u64) -> Option<String> {
        let peer = self.up.remove(&id)?;
        match self.keys.get(&peer) {
            Some((s, _)) if *s == id => {
                self.keys.remove(&peer);
                Some(peer)
            }
            _ => None,
        }
    }

    /// The agent of `node` on the session its key belongs to.
    pub fn agent(&self, node: &str) -> Option<ActorRef<WorkerInbox>> {
        let (session, _) = self.keys.get(node)?;
        agent_on(node, *session)
    }

    /// The session that speaks for `node`, its agent there, and that session's key (made on the
    /// first ask): the session holding the node's key while it is up, else the node's latest
    /// authenticated session. `None` until the agent is visible through pg. A name is held by the
    /// first session that took it until that session closes (node names are unique per worker
    /// process, so only a peer impersonating a live worker claims a live name): a second session
    /// claiming it gets nothing, and the holder is welcomed again with its own key.
    pub fn hello(&mut self, node: &str) -> Option<(ActorRef<WorkerInbox>, String)> {
        let session = self
            .up
            .iter()
            .filter(|(_, p)| p.as_str() == node)
            .map(|(id, _)| *id)
            .max()?;
        if let Some((holder, key)) = self.keys.get(node) {
            if self.up.contains_key(holder) {
                if *holder != session {
                    tracing::warn!(%node, session, holder, "cluster: a second session claims a live node's name; refused");
                }
                return agent_on(node, *holder).map(|a| (a, key.clone()));
            }
        }
        let agent = agent_on(node, session)?;
        let key = match self.keys.get(node) {
            Some((s, k)) if *s == session => k.clone(),
            _ => {
                let k = uuid::Uuid::new_v4().simple().to_string();
                self.keys.insert(node.to_string(), (session, k.clone()));
                k
            }
        };
        Some((agent, key))
    }

    /// Whether `key` is `node`'s current key.
    pub fn check(&self, node: &str, key: &str) -> bool {
        self.keys.get(node).is_some_and(|(_, k)| same(k, key))
    }
}

/// The head's exported inbox (pg group `tessera.head`): hands decoded frames to `ClusterHead`.
pub struct HeadPort;

pub struct HeadPortState {
    head: ActorRef<HeadMsg>,
    last_warning: Option<Instant>,
}

impl Actor for HeadPort {
    type Msg = HeadInbox;
    type State = HeadPortState;
    type Arguments = ActorRef<HeadMsg>;

    async fn pre_start(
        &self,
        myself: ActorRef<HeadInbox>,
        head: ActorRef<HeadMsg>,
    ) -> Result<HeadPortState, ActorProcessingErr> {
        ractor::pg::join(HEAD_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(HeadPortState {
            head,
            last_warning: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<HeadInbox>,
        msg: HeadInbox,
        state: &mut HeadPortState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HeadInbox::Frame(frame) => {
                let _ = state.head.cast(HeadMsg::Peer(frame));
            }
            HeadInbox::Undecodable(why) => {
                if state
                    .last_warning
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
                {
                    state.last_warning = Some(Instant::now());
                    tracing::warn!(%why, "cluster: an undecodable frame was dropped");
                }
            }
        }
        Ok(())
    }
}

/// Forwards session events of the node server to `ClusterHead`, marks gate connections
/// authenticated (or closed), and stops sessions that did not come through the gate.
pub struct SessionEvents {
    head: ActorRef<HeadMsg>,
    conns: Conns,
    authenticated: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl SessionEvents {
    pub fn new(head: ActorRef<HeadMsg>, conns: Conns) -> Self {
        Self {
            head,
            conns,
            authenticated: Default::default(),
        }
    }
}

fn peer_of(ses: &NodeServerSessionInformation) -> String {
    ses.peer_name
        .as_ref()
        .map(|n| n.name.split('@').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if ses.is_server && !self.conns.is_ours(&ses.peer_addr) {
            tracing::warn!(peer = %ses.peer_addr, "cluster: a session that did not come through the cluster port was stopped");
            ses.actor.stop(Some("not through the gate".into()));
        }
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        let peer = peer_of(&ses);
        if let Err(why) = self.conns.name_bound(&ses.peer_addr, &peer) {
            tracing::warn!(peer = %ses.peer_addr, node = %peer, %why, "cluster: a node claims a name its certificate does not bear; session stopped");
            ses.actor
                .stop(Some("node name not bound to its certificate".into()));
            return;
        }
        self.conns.authenticated(&ses.peer_addr);
        self.authenticated
            .lock()
            .expect("sessions")
            .insert(ses.node_id);
        let _ = self.head.cast(HeadMsg::SessionUp {
            id: ses.node_id,
            peer,
        });
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        self.conns.closed(&ses.peer_addr);
        let authenticated = self
            .authenticated
            .lock()
            .expect("sessions")
            .remove(&ses.node_id);
        let _ = self.head.cast(HeadMsg::SessionClosed {
            id: ses.node_id,
            label: ses.peer_addr.clone(),
            authenticated,
        });
    }
}
