//! Fine-tune jobs: their records ([`types`]), their SQLite persistence ([`store`]) and its lock
//! ([`lock`]), and the job manager actor that queues them by priority and hands them to idle
//! trainers ([`manager`]).

pub mod lock;
pub mod manager;
pub mod store;
pub mod types;

pub use lock::{DbLock, DbLockError};
pub use manager::{JobManager, JobManagerArgs, JobMsg, JobStats};
pub use store::JobStore;
pub use types::*;
