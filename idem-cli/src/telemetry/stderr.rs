//! Stderr for log lines without `std::io::Stderr`'s process-wide lock, under
//! which the runtime's threads queued for each other at the default level,
//! where every guarded request writes a line (~0.46 `futex` calls per
//! request, BENCHMARKS.md).

use std::io::Write;
use std::sync::{Arc, RwLock};

/// Stderr for log lines: a duplicate of descriptor 2 behind a
/// [`LogWriter`]. The duplicate keeps the file descriptor 2 named at
/// start-up (idem never points it elsewhere). When it cannot be duplicated
/// (no descriptor left) or off Unix, the writer goes through std's locked
/// stderr instead.
pub(super) fn writer() -> Arc<LogWriter> {
    #[cfg(unix)]
    let file = {
        use std::os::fd::AsFd as _;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::fs::File::from)
    };
    #[cfg(not(unix))]
    let file = None;
    Arc::new(LogWriter {
        file,
        long: RwLock::new(()),
    })
}

/// Writes whole log lines, each handed over in one `write_all` (as the fmt
/// layer does: it formats a line whole first), to a file every thread
/// shares. A line of up to [`PIPE_BUF`] bytes goes out in one `write(2)`,
/// which the kernel keeps whole even on a pipe: such lines need no lock
/// between them and take only a shared one. A longer line (a long path or
/// error chain) may be written in pieces, so it takes the lock alone: no
/// other line of this writer lands between its pieces. (Writes to stderr
/// by other means, `eprintln!` or another process on the same pipe, are not
/// ordered with these, as they were not with std's lock across processes;
/// only `write_all` keeps a line whole.)
#[derive(Debug)]
pub(super) struct LogWriter {
    /// The duplicate; `None`: std's stderr.
    file: Option<std::fs::File>,
    long: RwLock<()>,
}

/// The most bytes a pipe takes in one piece: Linux's `PIPE_BUF`; elsewhere
/// POSIX's least (macOS's and the BSDs').
#[cfg(target_os = "linux")]
const PIPE_BUF: usize = 4096;
#[cfg(not(target_os = "linux"))]
const PIPE_BUF: usize = 512;

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.as_ref() {
            Some(mut file) => file.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let Some(mut file) = self.file.as_ref() else {
            // Std's stderr keeps its lines apart by its own lock.
            return std::io::stderr().write_all(buf);
        };
        // A poisoned lock guards nothing broken: the guard holds no data.
        if buf.len() <= PIPE_BUF {
            let _shared = self.long.read().unwrap_or_else(|e| e.into_inner());
            file.write_all(buf)
        } else {
            let _alone = self.long.write().unwrap_or_else(|e| e.into_inner());
            file.write_all(buf)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_ref() {
            Some(mut file) => file.flush(),
            None => std::io::stderr().flush(),
        }
    }
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::io::BufRead as _;

    use super::*;

    /// Lines from several threads through one pipe, the long ones larger
    /// than the pipe's buffer (so the kernel must take each in pieces):
    /// every line read back is one thread's, whole.
    #[test]
    fn concurrent_lines_stay_whole_on_a_pipe() {
        let (reader, pipe) = std::io::pipe().unwrap();
        let writer = Arc::new(LogWriter {
            file: Some(std::fs::File::from(std::os::fd::OwnedFd::from(pipe))),
            long: RwLock::new(()),
        });
        let lengths = [200 * 1024, 100, 1000, PIPE_BUF - 1];
        let threads: Vec<_> = (b'a'..=b'f')
            .map(|mark| {
                let writer = Arc::clone(&writer);
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let mut line = vec![mark; lengths[i % lengths.len()]];
                        line.push(b'\n');
                        (&*writer).write_all(&line).unwrap();
                    }
                })
            })
            .collect();
        let read = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(reader).lines() {
                lines.push(line.unwrap());
            }
            lines
        });
        for t in threads {
            t.join().unwrap();
        }
        drop(writer);
        let lines = read.join().unwrap();
        assert_eq!(lines.len(), 6 * 40);
        for line in &lines {
            let first = line.as_bytes()[0];
            assert!(
                line.bytes().all(|b| b == first),
                "a line of {} bytes mixes threads' bytes",
                line.len()
            );
            assert!(lengths.contains(&line.len()), "{} bytes", line.len());
        }
    }
}
