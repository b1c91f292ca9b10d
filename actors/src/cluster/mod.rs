//! Several nodes as one cluster over `ractor_cluster` (star topology: workers dial the head).
//! [`wire`] holds what crosses the socket, [`head`] the head's endpoint (registration, routing to
//! remote replicas and trainers, heartbeats, eviction), [`worker`] a worker's agent and dial loop.

pub mod head;
pub mod wire;
pub mod worker;
