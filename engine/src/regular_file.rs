//! Opening files that requests name (datasets, model files, adapters): regular files only, their
//! size checked on the opened file, never a FIFO open that blocks a thread for ever.
//!
//! A path checked with `is_file()` and opened later can be swapped in between (a link to
//! `/dev/zero`, a FIFO), and a sparse file can claim gigabytes it never wrote. So the file is
//! opened once, without blocking (`O_NONBLOCK`: opening a FIFO for reading returns at once), and
//! what was opened is checked with `fstat`: a regular file, within the size allowed. Reads then go
//! through that same descriptor (regular files ignore `O_NONBLOCK`), bounded by the size seen.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for reading if it is a regular file of at most `max_bytes` (`None`: any size);
/// returns the file and its size. Errors: `InvalidInput` for a file that is not regular,
/// `FileTooLarge` for one over the size.
pub fn open(path: &Path, max_bytes: Option<u64>) -> io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({what})"),
        ));
    }
    let size = meta.len();
    if let Some(max) = max_bytes {
        if size > max {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("{size} bytes, more than the {max} allowed"),
            ));
        }
    }
    Ok((file, size))
}

/// The whole of a regular file of at most `max_bytes`.
pub fn read(path: &Path, max_bytes: Option<u64>) -> io::Result<Vec<u8>> {
    let (file, size) = open(path, max_bytes)?;
    let mut out = Vec::with_capacity(size as usize);
    // Never more than the size seen: a file that grows meanwhile is read as it was.
    file.take(size).read_to_end(&mut out)?;
    Ok(out)
}

/// The whole of a regular UTF-8 text file of at most `max_bytes`.
pub fn read_to_string(path: &Path, max_bytes: Option<u64>) -> io::Result<String> {
    String::from_utf8(read(path, max_bytes)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Largest JSON side file of a model (config, tokenizer, index, adapter config) read whole.
pub const MAX_JSON_BYTES: u64 = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_to_string(&file, Some(5)).unwrap(), "hello");
        let e = read(&file, Some(4)).unwrap_err();
        assert!(e.to_string().contains("5 bytes, more than the 4"), "{e}");
        // A link to a device, a FIFO (opened without blocking), a directory.
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read(&link, None)
            .unwrap_err()
            .to_string()
            .contains("a device"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read(&fifo, None)
            .unwrap_err()
            .to_string()
            .contains("a FIFO"));
        assert!(read(dir.path(), None)
            .unwrap_err()
            .to_string()
            .contains("a directory"));
        // A sparse file that claims more than it holds is refused by its size, unread.
        let sparse = dir.path().join("sparse");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        assert!(open(&sparse, Some(1 << 20)).is_err());
    }
}
