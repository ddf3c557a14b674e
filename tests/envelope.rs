//! Device-state envelope: decoding rejections through the public API, and vetoes at
//! state validation through the receiver (the source resumes; nothing is restored).

mod setup_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use livemig::device::envelope::{self, Entry, EnvelopeError, MAX_BLOB_LEN, MAX_ID_LEN};
use livemig::device::{ParticipantError, RestoreState, SaveState, Veto};
use livemig::engine::MigrationError;
use livemig::receiver::{ReceiveError, Receiver};
use setup_common::{guest, migrate, source};

fn sample() -> Vec<u8> {
    envelope::encode(&[Entry {
        id: "vcpu0".into(),
        version: 1,
        blob: vec![9; 32],
    }])
}

#[test]
fn wrong_magic_is_rejected() {
    let mut b = sample();
    b[..4].copy_from_slice(b"QEVM");
    assert_eq!(envelope::decode(&b), Err(EnvelopeError::BadMagic));
}

#[test]
fn unknown_major_version_is_rejected() {
    let mut b = sample();
    b[4..6].copy_from_slice(&(envelope::MAJOR + 1).to_le_bytes());
    assert!(matches!(
        envelope::decode(&b),
        Err(EnvelopeError::Version { major, .. }) if major == envelope::MAJOR + 1
    ));
}

#[test]
fn over_long_lengths_are_rejected() {
    let mut b = sample();
    // id length field right after the 12-byte header
    b[12..14].copy_from_slice(&((MAX_ID_LEN + 1) as u16).to_le_bytes());
    assert!(matches!(
        envelope::decode(&b),
        Err(EnvelopeError::TooLong { what: "id", .. })
    ));
    let mut b = sample();
    let len_at = 12 + 2 + 5 + 4;
    b[len_at..len_at + 4].copy_from_slice(&((MAX_BLOB_LEN + 1) as u32).to_le_bytes());
    assert!(matches!(
        envelope::decode(&b),
        Err(EnvelopeError::TooLong { what: "blob", .. })
    ));
    let mut b = sample();
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        envelope::decode(&b),
        Err(EnvelopeError::TooLong {
            what: "entry count",
            ..
        })
    ));
}

#[test]
fn bad_checksum_is_rejected() {
    let mut b = sample();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert_eq!(
        envelope::decode(&b),
        Err(EnvelopeError::Checksum(livemig::wire::PeerText::new(
            "vcpu0"
        )))
    );
}

/// Calls seen by the test participants.
#[derive(Debug, Default)]
struct Calls {
    saves: AtomicU32,
    releases: AtomicU32,
    rollbacks: AtomicU32,
    commits: AtomicU32,
    validates: AtomicU32,
    restores: AtomicU32,
    discards: AtomicU32,
}

struct Src {
    id: String,
    version: u32,
    blob: Vec<u8>,
    calls: Arc<Calls>,
}

impl SaveState for Src {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        self.calls.saves.fetch_add(1, Ordering::SeqCst);
        out.extend_from_slice(&self.blob);
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        self.calls.releases.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn committed(&mut self) {
        self.calls.commits.fetch_add(1, Ordering::SeqCst);
    }
    fn rolled_back(&mut self) {
        self.calls.rollbacks.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reads format version 1 only.
struct Dst {
    id: String,
    calls: Arc<Calls>,
}

impl RestoreState for Dst {
    fn id(&self) -> &str {
        &self.id
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, version: u32, _blob: &[u8]) -> Result<(), Veto> {
        self.calls.validates.fetch_add(1, Ordering::SeqCst);
        if version != 1 {
            return Err(Veto {
                participant: self.id.clone(),
                reason: format!("state format {version} is newer than this host reads (1)"),
            });
        }
        Ok(())
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        self.calls.restores.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&mut self) {
        self.calls.discards.fetch_add(1, Ordering::SeqCst);
    }
}

fn pair(id: &str, version: u32, blob: Vec<u8>, src: &Arc<Calls>, dst: &Arc<Calls>) -> (Src, Dst) {
    (
        Src {
            id: id.into(),
            version,
            blob,
            calls: src.clone(),
        },
        Dst {
            id: id.into(),
            calls: dst.clone(),
        },
    )
}

#[test]
fn participant_veto_at_state_validation_resumes_the_source() {
    let (sc, dc) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
    // "nic0" is fine; "vcpu0" sends a newer state format the destination vetoes.
    let (s1, d1) = pair("nic0", 1, vec![1; 16], &sc, &dc);
    let (s2, d2) = pair("vcpu0", 2, vec![2; 16], &sc, &dc);
    let (m, vm, _) = source(guest(4));
    let m = m.participant(Box::new(s1)).participant(Box::new(s2));
    let r = Receiver::new()
        .participant(Box::new(d1))
        .participant(Box::new(d2));
    let (res, recv) = migrate(m, r);
    match res {
        Err(MigrationError::Vetoed(v)) => {
            assert_eq!(v.participant, "vcpu0");
            assert!(v.reason.contains("state format 2"), "{}", v.reason);
        }
        other => panic!("expected a veto, got {other:?}"),
    }
    assert!(matches!(recv, Err(ReceiveError::Vetoed(_))), "{recv:?}");
    assert!(vm.running() && vm.resumes.load(Ordering::SeqCst) == 1);
    assert_eq!(sc.saves.load(Ordering::SeqCst), 2);
    assert_eq!(
        sc.releases.load(Ordering::SeqCst),
        0,
        "nothing released before Prepared"
    );
    assert_eq!(sc.rollbacks.load(Ordering::SeqCst), 2);
    assert_eq!(sc.commits.load(Ordering::SeqCst), 0);
    assert_eq!(dc.restores.load(Ordering::SeqCst), 0, "no state half-moved");
    assert_eq!(dc.discards.load(Ordering::SeqCst), 2);
}

#[test]
fn over_long_blob_is_rejected_by_the_receiver_before_any_restore() {
    let (sc, dc) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
    let (s, d) = pair("big", 1, vec![0; MAX_BLOB_LEN + 1], &sc, &dc);
    let (m, vm, _) = source(guest(4));
    let (res, recv) = migrate(
        m.participant(Box::new(s)),
        Receiver::new().participant(Box::new(d)),
    );
    match res {
        Err(MigrationError::Vetoed(v)) => {
            assert_eq!(v.participant, "envelope");
            assert!(v.reason.contains("exceeds the cap"), "{}", v.reason);
        }
        other => panic!("expected the envelope veto, got {other:?}"),
    }
    assert!(recv.is_err());
    assert!(vm.running());
    assert_eq!(dc.validates.load(Ordering::SeqCst), 0);
    assert_eq!(dc.restores.load(Ordering::SeqCst), 0);
    assert_eq!(sc.rollbacks.load(Ordering::SeqCst), 1);
}

#[test]
fn successful_commit_releases_then_commits() {
    let (sc, dc) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
    let (s, d) = pair("nic0", 1, vec![7; 8], &sc, &dc);
    let (m, _, _) = source(guest(4));
    let (res, recv) = migrate(
        m.participant(Box::new(s)),
        Receiver::new().participant(Box::new(d)),
    );
    res.expect("migration");
    recv.expect("receive");
    assert_eq!(sc.releases.load(Ordering::SeqCst), 1);
    assert_eq!(sc.commits.load(Ordering::SeqCst), 1);
    assert_eq!(sc.rollbacks.load(Ordering::SeqCst), 0);
    assert_eq!(dc.restores.load(Ordering::SeqCst), 1);
    assert_eq!(dc.discards.load(Ordering::SeqCst), 0);
}
