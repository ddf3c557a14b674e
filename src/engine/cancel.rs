//! Cancellation: a flag the engine polls at every wait, plus hooks that cut the
//! streams a blocking call may be stuck on (setup), so cancel works in every phase
//! up to `Released`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::transport::{Connector, Stream, TransportError};

type Hook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    next: AtomicU64,
    hooks: Mutex<Vec<(u64, Hook)>>,
}

/// Cancels a running migration from another thread (API and Ctrl-C).
#[derive(Clone, Default)]
pub struct CancelToken(Arc<Inner>);

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Request cancellation: set the flag and run every registered hook.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let hooks = self.0.hooks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, h) in hooks.iter() {
            h();
        }
    }
    /// Was cancellation requested?
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Run `hook` on cancel until the returned guard is dropped (at once if the
    /// token is already cancelled).
    pub(crate) fn on_cancel(&self, hook: Hook) -> HookGuard {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        if self.is_cancelled() {
            hook();
        }
        self.0
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, hook));
        HookGuard {
            token: self.clone(),
            id,
        }
    }
}

/// Unregisters a cancel hook when dropped.
pub(crate) struct HookGuard {
    token: CancelToken,
    id: u64,
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        self.token
            .0
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

/// A connector whose streams are cut when the token is cancelled, for as long as
/// the connector lives (the setup stage: a cancel then ends a blocking handshake
/// read at once instead of after the reply timeout).
pub(crate) struct CancelConnector<'a> {
    inner: &'a dyn Connector,
    token: CancelToken,
    guards: Mutex<Vec<HookGuard>>,
}

impl<'a> CancelConnector<'a> {
    pub(crate) fn new(inner: &'a dyn Connector, token: CancelToken) -> Self {
        Self {
            inner,
            token,
            guards: Mutex::new(Vec::new()),
        }
    }
}

impl Connector for CancelConnector<'_> {
    fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        let s = self.inner.connect()?;
        let g = self.token.on_cancel(s.shutdown_handle());
        self.guards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(g);
        Ok(s)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_run_on_cancel_until_dropped() {
        let t = CancelToken::new();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let g = t.on_cancel(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        let h2 = hits.clone();
        let dropped = t.on_cancel(Box::new(move || {
            h2.fetch_add(100, Ordering::SeqCst);
        }));
        drop(dropped);
        t.cancel();
        assert!(t.is_cancelled());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        drop(g);
        // Registering on a cancelled token runs the hook at once.
        let h3 = hits.clone();
        let _g = t.on_cancel(Box::new(move || {
            h3.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(hits.load(Ordering::SeqCst), 11);
    }
}
