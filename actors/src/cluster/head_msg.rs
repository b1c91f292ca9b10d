//! The `ClusterHead`'s messages, apart from the actor so that the session handlers that send them
//! (`sessions.rs`) and the actor that owns the sessions (`head.rs`) do not import each other.

use super::wire::HeadFrame;

/// The `ClusterHead`'s messages: frames from workers (decoded and handed over by the exported
/// [`HeadPort`](super::sessions::HeadPort)) and the head's own events, which never come from the
/// socket (this type is not serialisable, so no peer can send it).
#[derive(Debug)]
pub enum HeadMsg {
    Peer(HeadFrame),
    /// The heartbeat timer.
    Tick,
    /// Session `id` passed the cookie check; its peer calls itself `peer`.
    SessionUp {
        id: u64,
        peer: String,
    },
    /// Session `id` closed (`authenticated`: it had passed the cookie check).
    SessionClosed {
        id: u64,
        label: String,
        authenticated: bool,
    },
}

impl ractor::Message for HeadMsg {}
