//! A value built from files and rebuilt when their contents change: TLS
//! certificates and keys, the API keys file. Kubernetes rotates a mounted
//! Secret by swapping a symlink, which file-change notifications miss, so
//! the files are read again every [`POLL`] and compared with the last read.
//! A read or build that fails (a half-written rotation) keeps the value in
//! use and is tried again at the next poll.

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

/// How often the files are read again.
pub const POLL: Duration = Duration::from_secs(1);

type Build<T, E> = dyn Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync;

/// The current value built from `paths`' contents.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    current: RwLock<Arc<T>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads `paths` and builds the first value (an error stops here: a
    /// process must not start with files it cannot use); then, on the
    /// current tokio runtime, watches them until the returned value is
    /// dropped. `what` names the value in logs ("TLS certificate").
    pub fn start<E: Display + From<ReadError> + 'static>(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, E> {
        let contents = read_all(&paths)?;
        let value = build(&contents)?;
        let reloading = Arc::new(Self {
            what,
            paths,
            current: RwLock::new(Arc::new(value)),
        });
        let build: Box<Build<T, E>> = Box::new(build);
        tokio::spawn(watch(Arc::downgrade(&reloading), contents, build));
        Ok(reloading)
    }

    /// The value as of the last successful read.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn replace(&self, value: T) {
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(value);
    }
}

/// A file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ReadError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| ReadError {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

async fn watch<T: Send + Sync + 'static, E: Display>(
    reloading: Weak<Reloading<T>>,
    mut last: Vec<Vec<u8>>,
    build: Box<Build<T, E>>,
) {
    let mut last_problem = String::new();
    loop {
        tokio::time::sleep(POLL).await;
        let Some(reloading) = reloading.upgrade() else {
            return;
        };
        let paths = reloading.paths.clone();
        let read = tokio::task::spawn_blocking(move || read_all(&paths)).await;
        let Ok(read) = read else { return };
        let contents = match read {
            Ok(contents) if contents == last => continue,
            Ok(contents) => contents,
            Err(err) => {
                note_problem(reloading.what, err.to_string(), &mut last_problem);
                continue;
            }
        };
        match build(&contents) {
            Ok(value) => {
                reloading.replace(value);
                last = contents;
                last_problem.clear();
                tracing::info!(what = reloading.what, "files changed: reloaded");
            }
            Err(err) => note_problem(reloading.what, err.to_string(), &mut last_problem),
        }
    }
}

/// Logs a problem once, not at every poll.
fn note_problem(what: &str, problem: String, last: &mut String) {
    if problem != *last {
        tracing::warn!(what, %problem, "files changed but cannot be used; keeping the last good ones");
        *last = problem;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_is_picked_up_and_a_bad_one_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let parse = |contents: &[Vec<u8>]| -> Result<u32, String> {
            std::str::from_utf8(&contents[0])
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .ok_or_else(|| "not a number".to_owned())
        };
        let reloading = Reloading::start("number", vec![path.clone()], parse).unwrap();
        assert_eq!(*reloading.current(), 1);
        std::fs::write(&path, "x").unwrap();
        tokio::time::sleep(POLL * 2).await;
        assert_eq!(*reloading.current(), 1, "a bad file keeps the last value");
        std::fs::write(&path, "2").unwrap();
        tokio::time::sleep(POLL * 2).await;
        assert_eq!(*reloading.current(), 2);
    }

    impl From<ReadError> for String {
        fn from(err: ReadError) -> Self {
            err.to_string()
        }
    }
}
