//! The destination's record of recent sessions' outcomes, and the answers to
//! `QueryOutcome`.
//!
//! A source that released its VM and lost the channel before `Committed` is in
//! doubt; it reconnects and asks. The record answers it: `committed` (the source
//! must never resume), `discarded` (it may), `in_progress` (ask again), or
//! `unknown`. A session enters the record when the destination sends `Prepared`
//! (from then on the source may send `Released` and be in doubt) and leaves it when
//! the record is full (oldest first). With a file (`recv --outcome-log FILE`) the
//! record survives the process: each change is appended as one line and a
//! `committed` line is synced to disk before `Committed` is sent. A session still
//! `in_progress` in a file left by an earlier process was never committed (the VM
//! lives in the receiving process, which ended) and loads as `discarded`.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::transport::framed::FrameReader;
use crate::transport::Acceptor;
use crate::wire::control::{SessionId, SessionOutcome};
use crate::wire::ControlMsg;

/// Sessions remembered by default.
pub const DEFAULT_CAPACITY: usize = 1024;
/// How long an answered query waits for the asker's `OutcomeKnown`.
pub const KNOWN_WAIT: Duration = Duration::from_secs(2);

/// A session id as operators and JSON see it.
pub fn session_to_string(s: SessionId) -> String {
    s.to_string()
}

/// Parse [`session_to_string`]'s form.
pub fn parse_session(s: &str) -> Result<SessionId, OutcomeLogError> {
    SessionId::parse(s.trim()).map_err(OutcomeLogError::BadSession)
}

/// Outcome-record failures.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeLogError {
    /// Not a session id.
    #[error("not a session id: {0}")]
    BadSession(#[source] crate::session::TokenError),
    /// The file could not be read or written.
    #[error("outcome log {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// A line of the file is not `<session> <outcome>`.
    #[error("outcome log {path} line {line}: {what}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        #[source]
        what: CorruptLine,
    },
}

/// What is wrong with a line of an outcome log file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptLine {
    /// No space between the session and the outcome.
    #[error("expected `<session> <outcome>`")]
    NoSeparator,
    /// The session is not a session id.
    #[error("{0}")]
    Session(#[source] crate::session::TokenError),
    /// The outcome is none of `committed`, `discarded`, `in_progress`, `unknown`.
    #[error("unknown outcome (expected committed, discarded, in_progress or unknown)")]
    Outcome,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    session: SessionId,
    outcome: SessionOutcome,
    /// The source said it knows the outcome (no query will come).
    known: bool,
}

/// Bounded record of recent sessions' outcomes.
#[derive(Debug)]
pub struct OutcomeLog {
    entries: Mutex<VecDeque<Entry>>,
    capacity: usize,
    file: Option<(PathBuf, Mutex<std::fs::File>)>,
}

impl Default for OutcomeLog {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

fn outcome_of(name: &str) -> Option<SessionOutcome> {
    [
        SessionOutcome::Committed,
        SessionOutcome::Discarded,
        SessionOutcome::InProgress,
        SessionOutcome::Unknown,
    ]
    .into_iter()
    .find(|o| o.name() == name)
}

impl OutcomeLog {
    /// An in-memory record of at most `capacity` sessions.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            file: None,
        }
    }

    /// A record kept in `path` too (created if missing; earlier lines loaded).
    pub fn open(path: &Path, capacity: usize) -> Result<Self, OutcomeLogError> {
        let io = |source| OutcomeLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let log = Self::new(capacity);
        match std::fs::File::open(path) {
            Ok(f) => {
                for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(io)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let corrupt = |what: CorruptLine| OutcomeLogError::Corrupt {
                        path: path.to_path_buf(),
                        line: i + 1,
                        what,
                    };
                    let (s, o) = line
                        .split_once(' ')
                        .ok_or_else(|| corrupt(CorruptLine::NoSeparator))?;
                    let session =
                        SessionId::parse(s.trim()).map_err(|e| corrupt(CorruptLine::Session(e)))?;
                    let outcome =
                        outcome_of(o.trim()).ok_or_else(|| corrupt(CorruptLine::Outcome))?;
                    // In progress when an earlier process ended: never committed.
                    let outcome = match outcome {
                        SessionOutcome::InProgress => SessionOutcome::Discarded,
                        o => o,
                    };
                    log.put(session, outcome, true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Rewrite compactly: the kept entries, one line each.
        let mut text = String::new();
        for e in log.lock().iter() {
            text.push_str(&format!(
                "{} {}\n",
                session_to_string(e.session),
                e.outcome.name()
            ));
        }
        std::fs::write(path, text).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            file: Some((path.to_path_buf(), Mutex::new(f))),
            ..log
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set `session`'s outcome; `known` applies to a new entry only.
    fn put(&self, session: SessionId, outcome: SessionOutcome, known: bool) {
        let mut es = self.lock();
        if let Some(e) = es.iter_mut().find(|e| e.session == session) {
            e.outcome = outcome;
            return;
        }
        if es.len() == self.capacity {
            es.pop_front();
        }
        es.push_back(Entry {
            session,
            outcome,
            known,
        });
    }

    /// Record `outcome` for `session` (a `committed` record is on disk before this
    /// returns, when there is a file).
    pub fn record(
        &self,
        session: SessionId,
        outcome: SessionOutcome,
    ) -> Result<(), OutcomeLogError> {
        self.put(session, outcome, false);
        if let Some((path, f)) = &self.file {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let io = |source| OutcomeLogError::Io {
                path: path.clone(),
                source,
            };
            writeln!(f, "{} {}", session_to_string(session), outcome.name()).map_err(io)?;
            if outcome == SessionOutcome::Committed {
                f.sync_data().map_err(io)?;
            }
        }
        Ok(())
    }

    /// The source knows the outcome of `session`.
    pub fn mark_known(&self, session: SessionId) {
        if let Some(e) = self.lock().iter_mut().find(|e| e.session == session) {
            e.known = true;
        }
    }

    /// What became of `session`.
    pub fn get(&self, session: SessionId) -> SessionOutcome {
        self.lock()
            .iter()
            .find(|e| e.session == session)
            .map_or(SessionOutcome::Unknown, |e| e.outcome)
    }

    /// Whether `session`'s source may still ask (None: not recorded).
    pub fn awaiting_query_for(&self, session: SessionId) -> Option<bool> {
        self.lock()
            .iter()
            .find(|e| e.session == session)
            .map(|e| !e.known)
    }

    /// Sessions whose source may still ask (it has not said it knows).
    pub fn awaiting_query(&self) -> usize {
        self.lock().iter().filter(|e| !e.known).count()
    }

    /// Answer one `QueryOutcome` on `control`, then wait briefly for the asker's
    /// `OutcomeKnown`.
    pub fn answer(&self, control: &mut FrameReader, session: SessionId) {
        let outcome = self.get(session);
        if control
            .send_control(&ControlMsg::Outcome { session, outcome }, &[])
            .is_err()
            || !outcome.is_final()
        {
            return;
        }
        self.await_known(control, session, KNOWN_WAIT);
    }

    /// Wait up to `wait` for `OutcomeKnown { session }` on `control` (any other
    /// message, an error or the end of the stream ends the wait).
    pub fn await_known(&self, control: &mut FrameReader, session: SessionId, wait: Duration) {
        let _ = control.stream().set_read_timeout(Some(wait));
        if let Ok((ControlMsg::OutcomeKnown { session: s }, _)) = control.control() {
            if s == session {
                self.mark_known(session);
            }
        }
    }

    /// Answer outcome queries arriving on `acceptor` until every recorded session's
    /// source knows its outcome or `linger` passes. Connections that are not
    /// queries get an `Error` (this destination is not receiving any more).
    pub fn serve(&self, acceptor: &dyn Acceptor, linger: Duration) {
        let until = Instant::now() + linger;
        while self.awaiting_query() > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let Ok(s) = acceptor.accept(left) else {
                // Some acceptors fail at once when their source is gone.
                std::thread::sleep(left.min(Duration::from_millis(20)));
                continue;
            };
            let _ = s.set_read_timeout(Some(KNOWN_WAIT));
            let mut c = FrameReader::new(s, "control");
            match c.control() {
                Ok((ControlMsg::QueryOutcome { session }, _)) => self.answer(&mut c, session),
                Ok((other, _)) => {
                    let _ = c.send_control(
                        &ControlMsg::Error {
                            message: format!(
                                "this destination only answers outcome queries now (got {})",
                                other.name()
                            ),
                        },
                        &[],
                    );
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u8) -> SessionId {
        parse_session(&format!("{n:032x}")).unwrap()
    }

    #[test]
    fn bounded_and_updated_in_place() {
        let log = OutcomeLog::new(2);
        let (s1, s2, s3) = (sid(1), sid(2), sid(3));
        log.record(s1, SessionOutcome::InProgress).unwrap();
        log.record(s1, SessionOutcome::Committed).unwrap();
        log.record(s2, SessionOutcome::Discarded).unwrap();
        assert_eq!(log.get(s1), SessionOutcome::Committed);
        log.record(s3, SessionOutcome::Committed).unwrap();
        assert_eq!(log.get(s1), SessionOutcome::Unknown, "oldest evicted");
        assert_eq!(log.get(s3), SessionOutcome::Committed);
        assert_eq!(log.awaiting_query(), 2);
        log.mark_known(s3);
        assert_eq!(log.awaiting_query(), 1);
    }

    #[test]
    fn a_file_survives_and_in_progress_loads_as_discarded() {
        let path = std::env::temp_dir().join(format!(
            "livemig-outcomes-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        {
            let log = OutcomeLog::open(&path, 8).unwrap();
            log.record(sid(0xab), SessionOutcome::Committed).unwrap();
            log.record(sid(0xde), SessionOutcome::InProgress).unwrap();
        }
        let log = OutcomeLog::open(&path, 8).unwrap();
        assert_eq!(log.get(sid(0xab)), SessionOutcome::Committed);
        assert_eq!(log.get(sid(0xde)), SessionOutcome::Discarded);
        assert_eq!(log.get(sid(0x1)), SessionOutcome::Unknown);
        std::fs::write(&path, "zz committed\n").unwrap();
        let e = OutcomeLog::open(&path, 8).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn session_ids_round_trip() {
        let s = session_to_string(sid(7));
        assert_eq!(s.len(), 32);
        assert_eq!(parse_session(&s).unwrap(), sid(7));
        assert!(parse_session("xyz").is_err());
        assert!(parse_session("").is_err());
    }
}
