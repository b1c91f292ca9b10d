//! One head per job database: an exclusive `flock` on `<db_path>.lock`, held for the life of the
//! node, so a second head started on the same database stops at once with a clear error instead
//! of running every job a second time.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Held while this process owns the database; the lock goes with it.
#[derive(Debug)]
pub struct DbLock {
    _lock: Flock<std::fs::File>,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DbLockError {
    #[error("jobs.db_path: {db} is in use by another head ({holder}); two heads cannot share one job database (stop the other, or give this one another jobs.db_path)")]
    Held { db: String, holder: String },
    #[error("jobs.db_path: {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl DbLock {
    /// Takes the lock of the database at `db`, without waiting.
    pub fn acquire(db: &Path) -> Result<DbLock, DbLockError> {
        let path = PathBuf::from(format!("{}.lock", db.display()));
        let io = |source| DbLockError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DbLockError::Held {
                    db: db.display().to_string(),
                    holder: if holder.is_empty() {
                        "its lock file is held".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        // Who holds it, for the error the next one gets.
        let host = sysinfo::System::host_name().unwrap_or_default();
        let who = format!("pid {} on {host}", std::process::id());
        lock.set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(who.as_bytes()))
            .and_then(|_| lock.flush())
            .map_err(io)?;
        Ok(DbLock { _lock: lock, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        let first = DbLock::acquire(&db).unwrap();
        let e = DbLock::acquire(&db).unwrap_err().to_string();
        assert!(e.starts_with("jobs.db_path:"), "{e}");
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "names the holder: {e}"
        );
        drop(first);
        DbLock::acquire(&db).unwrap();
    }
}
