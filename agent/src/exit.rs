//! Exit codes, stable and documented (README "Exit codes"). Scripts, cron
//! and systemd act on them: `RestartPreventExitStatus=78` stops a restart
//! loop on a host whose agent configuration is broken.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 1: the run failed (network, I/O, apply); the host keeps its previous
    /// state; retrying later may succeed.
    Failed,
    /// 2: a usage error the command line parser could not see (e.g.
    /// `init` into a directory that is not empty).
    Usage,
    /// 3: the repository content is invalid for this host (parse, render,
    /// plan errors); nothing was applied; fix the repository.
    InvalidRepo,
    /// 4: refused by policy: history rewritten or older than the applied
    /// commit, a bad or missing signature, an invalid bundle.
    Refused,
    /// 5: a failed commit was reverted but the revert's checks failed too;
    /// driftless stops touching the host until `sync --retry`.
    Degraded,
    /// 75 (EX_TEMPFAIL): another run holds the lock.
    Busy,
    /// 78 (EX_CONFIG): the agent's own configuration is invalid.
    Config,
}

impl Failure {
    pub fn code(self) -> u8 {
        match self {
            Failure::Failed => 1,
            Failure::Usage => 2,
            Failure::InvalidRepo => 3,
            Failure::Refused => 4,
            Failure::Degraded => 5,
            Failure::Busy => 75,
            Failure::Config => 78,
        }
    }
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Error {
    pub kind: Failure,
    pub error: anyhow::Error,
}

impl Error {
    pub fn new(kind: Failure, error: impl Into<anyhow::Error>) -> Self {
        Error {
            kind,
            error: error.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Tags a `Result` with the exit code its error should produce.
pub trait Classify<T> {
    fn kind(self, kind: Failure) -> Result<T, Error>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn kind(self, kind: Failure) -> Result<T, Error> {
        self.map_err(|e| Error::new(kind, e))
    }
}
