//! What binds one migration's connections together.
//!
//! A migration is one control stream plus N page streams. The source draws a
//! [`SessionToken`] when it connects, sends it in `Hello` and repeats it in every
//! page stream's `StreamHello`; the destination accepts a page stream only if its
//! token equals the one its `Hello` carried. The token is unguessable (16 bytes from
//! the operating system's random source) and compared in constant time, so a
//! connection from anyone who did not see the handshake cannot join the session.
//!
//! [`deadline`] bounds whole exchanges (a hello, the setup) rather than single
//! reads, so a peer that trickles bytes cannot hold the destination.

pub mod deadline;
pub mod token;

pub use deadline::{Deadline, DeadlineStream};
pub use token::{SessionToken, TokenError};
