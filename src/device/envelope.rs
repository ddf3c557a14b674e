//! Versioned envelope for device state (filled in below).
