//! The fence around the model roots: every file the registry stats for a listing or opens for
//! reading goes through here.
//!
//! The rule: only regular files whose real location (after resolving every symlink) lies under a
//! configured model root are stamped or opened. A path is resolved against the canonical roots,
//! then the resolved path is opened with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` (a FIFO or device
//! swapped in cannot block or grab a terminal; a link swapped in at the last component fails), and
//! the opened descriptor is checked again: it must be a regular file, the same file (device,
//! inode) that was checked, and its real path (`/proc/self/fd/N`) must still lie under a root, so
//! a directory swapped for a link between the check and the open is caught.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file was not stamped or opened.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("resolves to a path outside the model roots; not opened")]
    Outside,
    #[error("is not a regular file ({0}); not opened")]
    NotRegular(&'static str),
    #[error("path is not valid UTF-8; skipped")]
    NotUtf8,
    #[error("changed while it was being opened; not opened")]
    Changed,
    #[error("is {size} bytes; limit {limit}")]
    TooLarge { size: u64, limit: u64 },
}

impl FenceError {
    /// The file does not exist (a missing shard, a vanished file), as opposed to being refused.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FenceError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A name for a file type that is not a regular file.
pub fn kind_name(md: &Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// The canonical model roots, and safe access to the files under them.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    roots: Vec<PathBuf>,
}

impl Fence {
    /// Canonicalize `roots`; roots that cannot be resolved are left out (nothing is under them).
    pub fn new(roots: &[PathBuf]) -> Self {
        Self {
            roots: roots
                .iter()
                .filter_map(|r| std::fs::canonicalize(r).ok())
                .collect(),
        }
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Is `p` (already canonical) under one of the roots?
    pub fn contains(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    /// Resolve `path` (every symlink) and check that it is a regular file under a root. Returns the
    /// resolved path and its metadata. Opens nothing.
    pub fn check(&self, path: &Path) -> Result<(PathBuf, Metadata), FenceError> {
        if path.to_str().is_none() {
            return Err(FenceError::NotUtf8);
        }
        let real = std::fs::canonicalize(path)?;
        if real.to_str().is_none() {
            return Err(FenceError::NotUtf8);
        }
        if !self.contains(&real) {
            return Err(FenceError::Outside);
        }
        let md = std::fs::symlink_metadata(&real)?;
        if !md.is_file() {
            return Err(FenceError::NotRegular(kind_name(&md)));
        }
        Ok((real, md))
    }

    /// Open `path` for reading, under the rule above (see the module documentation).
    pub fn open(&self, path: &Path) -> Result<File, FenceError> {
        let (real, md) = self.check(path)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&real)?;
        let fmd = f.metadata()?;
        if !fmd.is_file() {
            return Err(FenceError::NotRegular(kind_name(&fmd)));
        }
        if (fmd.dev(), fmd.ino()) != (md.dev(), md.ino()) {
            return Err(FenceError::Changed);
        }
        // Where the descriptor really points (a path component swapped for a link after the
        // check is caught here). Without /proc, the (device, inode) comparison above stands.
        if let Ok(at) = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
            && !self.contains(&at)
        {
            return Err(FenceError::Outside);
        }
        clear_nonblock(&f)?;
        Ok(f)
    }

    /// Read a whole small file (at most `limit` bytes) through [`Fence::open`].
    pub fn read(&self, path: &Path, limit: u64) -> Result<Vec<u8>, FenceError> {
        let f = self.open(path)?;
        let size = f.metadata()?.len();
        if size > limit {
            return Err(FenceError::TooLarge { size, limit });
        }
        let mut buf = Vec::with_capacity(size as usize);
        f.take(limit + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > limit {
            return Err(FenceError::TooLarge {
                size: buf.len() as u64,
                limit,
            });
        }
        Ok(buf)
    }
}

/// Reads of a regular file do not care, but leave the descriptor as a plain blocking one.
fn clear_nonblock(f: &File) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function borrows from a live `File`; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_regular_files_under_the_roots_only() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("ok"), b"hello").unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("out")).unwrap();
        std::os::unix::fs::symlink(r.join("ok"), r.join("in")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("dirlink")).unwrap();
        let fifo = r.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let fence = Fence::new(&[r.to_path_buf()]);
        assert_eq!(fence.read(&r.join("ok"), 100).unwrap(), b"hello");
        assert_eq!(fence.read(&r.join("in"), 100).unwrap(), b"hello");
        assert!(matches!(
            fence.open(&r.join("out")),
            Err(FenceError::Outside)
        ));
        assert!(matches!(
            fence.open(&r.join("dirlink/secret")),
            Err(FenceError::Outside)
        ));
        assert!(matches!(
            fence.open(&fifo),
            Err(FenceError::NotRegular("FIFO"))
        ));
        assert!(matches!(
            fence.open(r),
            Err(FenceError::NotRegular("directory"))
        ));
        assert!(fence.open(&r.join("missing")).unwrap_err().is_not_found());
        assert!(matches!(
            fence.read(&r.join("ok"), 2),
            Err(FenceError::TooLarge { .. })
        ));
        let odd =
            r.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff.gguf"));
        assert!(matches!(fence.open(&odd), Err(FenceError::NotUtf8)));
    }
}
