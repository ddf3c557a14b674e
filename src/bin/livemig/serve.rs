//! `livemig recv --serve`: the destination as a service.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use livemig::receiver::{Received, Receiver, ReceiverConfig};
use livemig::service::{
    HandlerError, Outcome, Service, ServiceConfig, ServiceEvent, SessionHandler,
};

/// What `recv --serve` does with each session.
struct Handler {
    receiver: ReceiverConfig,
    out_dir: Option<PathBuf>,
    json: bool,
}

impl SessionHandler for Handler {
    fn receiver(&self, _session: &str) -> Receiver {
        Receiver::new().config(self.receiver.clone())
    }

    fn committed(&self, session: &str, received: Received) -> Result<(), HandlerError> {
        if let Some(dir) = &self.out_dir {
            super::write_image(&received.memory, &dir.join(format!("{session}.img")))?;
        }
        Ok(())
    }

    fn event(&self, event: &ServiceEvent) {
        if self.json {
            // One write per line (lines from session threads never interleave); a
            // closed stdout must not take the service down.
            if let Ok(line) = serde_json::to_string(event) {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
            return;
        }
        match event {
            ServiceEvent::Listening { addr, max_sessions } => {
                eprintln!("serving on {addr}, {max_sessions} migration(s) at once")
            }
            ServiceEvent::Queued {
                session, position, ..
            } => eprintln!("session {session}: queued (position {position})"),
            ServiceEvent::SessionStart {
                session, streams, ..
            } => eprintln!("session {session}: started, {streams} page stream(s)"),
            ServiceEvent::SessionEnd(e) => match e.outcome {
                Outcome::Committed => eprintln!(
                    "session {}: committed {} bytes in {:.0} ms, digest {} verified",
                    e.session,
                    e.memory_bytes,
                    e.ms,
                    e.digest.as_deref().unwrap_or("-")
                ),
                _ => eprintln!(
                    "session {}: {:?}: {}",
                    e.session,
                    e.outcome,
                    e.error.as_deref().unwrap_or("")
                ),
            },
            ServiceEvent::Refused { peer, reason, .. } => {
                eprintln!("connection from {peer} refused: {reason}")
            }
            ServiceEvent::Stopped(s) => eprintln!(
                "stopped: {} session(s), {} committed, {} refused, {} failed, {} stray connection(s) refused",
                s.sessions, s.committed, s.refused, s.failed, s.refused_connections
            ),
        }
    }
}

/// Serve migrations on `listen` until SIGINT or SIGTERM.
pub fn run(
    listen: &str,
    config: ServiceConfig,
    receiver: ReceiverConfig,
    out_dir: Option<PathBuf>,
    json: bool,
) -> Result<(), String> {
    if let Some(dir) = &out_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let service = Service::bind(listen, config).map_err(|e| e.to_string())?;
    let summary = service
        .run(Arc::new(Handler {
            receiver,
            out_dir,
            json,
        }))
        .map_err(|e| e.to_string())?;
    if summary.abandoned > 0 {
        return Err(format!(
            "stopped with {} session(s) still running past the drain timeout",
            summary.abandoned
        ));
    }
    Ok(())
}
