//! Destination memory prepared in advance (`Receiver::prepared_memory`): a guest
//! whose layout fits is received into it with nothing allocated at setup; one that
//! does not fit is refused at setup.

mod setup_common;

use std::sync::Arc;

use livemig::engine::MigrationError;
use livemig::receiver::{prepare_memory, ReceiveError, Receiver, ReceiverConfig, RefuseReason};
use livemig::wire::control::RefuseCode;
use setup_common::{guest, migrate, source};

fn config(prealloc: bool) -> ReceiverConfig {
    let mut settings = ReceiverConfig::default();
    settings.prealloc = prealloc;
    settings.huge_pages = false;
    settings
}

#[test]
fn prepared_memory_is_used_and_setup_allocates_nothing() {
    for prealloc in [false, true] {
        let mem = guest(8);
        let before = mem.full_digest(2).unwrap();
        let prepared = prepare_memory(8 << 20, &config(prealloc)).unwrap();
        let (m, _, _) = source(mem);
        let r = Receiver::new()
            .config(config(prealloc))
            .prepared_memory(prepared.clone());
        let (res, recv) = migrate(m, r);
        res.expect("migration");
        let received = recv.expect("receive");
        assert!(received.report.memory_prepared);
        assert!(
            Arc::ptr_eq(&received.memory, &prepared),
            "the destination memory handed back is the prepared one"
        );
        assert_eq!(prepared.full_digest(2).unwrap(), before);
    }
}

#[test]
fn memory_allocated_at_setup_is_not_reported_prepared() {
    let mem = guest(4);
    let (m, _, _) = source(mem);
    let (res, recv) = migrate(m, Receiver::new().config(config(false)));
    res.expect("migration");
    assert!(!recv.expect("receive").report.memory_prepared);
}

#[test]
fn a_guest_bigger_than_the_prepared_memory_is_refused_at_setup() {
    let mem = guest(16);
    let prepared = prepare_memory(8 << 20, &config(true)).unwrap();
    let (m, vm, counter) = source(mem);
    let r = Receiver::new()
        .config(config(true))
        .prepared_memory(prepared);
    let (res, recv) = migrate(m, r);
    match recv {
        Err(ReceiveError::Refused { code, reason }) => {
            assert_eq!(code, RefuseCode::MemoryLayout);
            assert!(
                matches!(
                    reason,
                    RefuseReason::LayoutMismatch {
                        source_bytes,
                        dest_bytes,
                        prepared: true,
                        ..
                    } if source_bytes == 16 << 20 && dest_bytes == 8 << 20
                ),
                "{reason:?}"
            );
            let message = reason.to_string();
            assert!(
                message.contains(&(16u64 << 20).to_string())
                    && message.contains(&(8u64 << 20).to_string()),
                "the refusal names both sizes: {message}"
            );
        }
        other => panic!("expected a memory layout refusal, got {other:?}"),
    }
    match res {
        Err(MigrationError::Refused { code, .. }) => assert_eq!(code, RefuseCode::MemoryLayout),
        other => panic!("expected the source refused, got {other:?}"),
    }
    assert!(counter.nothing_sent(), "a refusal costs no page transfer");
    assert!(vm.never_paused());
}
