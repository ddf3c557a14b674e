//! The error a hypervisor's [`super::VmControl`] returns.

use std::error::Error;
use std::fmt;

/// Why pausing, resuming or throttling the VM failed: the hypervisor's own error,
/// boxed, so a VMM returns whatever error type it has (an `std::io::Error`, its
/// own enum, or a message) and gets it back through [`VmControlError::get_ref`],
/// [`VmControlError::into_inner`] or `source()` chains.
///
/// ```
/// use livemig::engine::VmControlError;
/// let e = VmControlError::from(std::io::Error::other("vCPU 3 did not stop"));
/// assert_eq!(e.to_string(), "vCPU 3 did not stop");
/// assert!(e.get_ref().downcast_ref::<std::io::Error>().is_some());
/// let m: VmControlError = "no such VM".into();
/// assert_eq!(m.to_string(), "no such VM");
/// ```
pub struct VmControlError(Box<dyn Error + Send + Sync>);

impl VmControlError {
    /// Wrap the hypervisor's error.
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(error.into())
    }
    /// The hypervisor's error.
    pub fn get_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }
    /// The hypervisor's error, unwrapped.
    pub fn into_inner(self) -> Box<dyn Error + Send + Sync> {
        self.0
    }
}

impl fmt::Debug for VmControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for VmControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for VmControlError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl From<std::io::Error> for VmControlError {
    fn from(e: std::io::Error) -> Self {
        Self(Box::new(e))
    }
}

impl From<String> for VmControlError {
    fn from(message: String) -> Self {
        Self(message.into())
    }
}

impl From<&str> for VmControlError {
    fn from(message: &str) -> Self {
        Self(message.into())
    }
}
