//! Fine-tune jobs: their records ([`types`]), their SQLite persistence ([`store`]) and its lock
//! ([`lock`]), and the job manager actor that queues them by priority and hands them to idle
//! trainers ([`manager`]), with its messages apart ([`messages`]).

pub mod lock;
pub mod manager;
pub mod messages;
pub mod store;
pub mod types;

pub use lock::{DbLock, DbLockError};
pub use manager::{JobManager, JobManagerArgs};
pub use messages::{JobMsg, JobStats};
pub use store::JobStore;
pub use types::*;
