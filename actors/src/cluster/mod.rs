//! Several nodes as one cluster over `ractor_cluster` (star topology: workers dial the head).
//! [`wire`] holds what crosses the socket, [`head`] the head's endpoint (registration, routing to
//! remote replicas and trainers, heartbeats, eviction), [`sessions`] which session speaks for
//! which node, [`gate`] the head's accept loop (connection cap, handshake deadline, TLS), [`tls`]
//! the mutual TLS configuration and the worker's dial, [`worker`] a worker's agent and dial loop,
//! [`supervision`] the supervisor of these actors (it escalates: see there why).

pub mod confine;
pub mod gate;
pub mod head;
pub mod head_msg;
pub mod sessions;
pub mod supervision;
pub mod tls;
pub mod wire;
pub mod worker;
