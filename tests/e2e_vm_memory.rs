//! A guest held in rust-vmm `vm-memory` (feature `vm-memory`) migrates, under a running
//! dirtier, into a destination VMM's own `GuestMemoryMmap`; both sides' vm-memory
//! objects are then compared through vm-memory's own accessors.
#![cfg(feature = "vm-memory")]

mod common;

use std::sync::Arc;

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Migration, Mode, Verify};
use livemig::memory::vm_memory::vm_memory_for_layout;
use livemig::receiver::Receiver;
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::{GuestMemory, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Every page of `a` equals the same page of `b`, read through vm-memory.
fn assert_same_vm_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    let (mut pa, mut pb) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    let mut pages = 0;
    for r in a.iter() {
        for off in (0..r.len()).step_by(PAGE_SIZE) {
            let gpa = GuestAddress(r.start_addr().0 + off);
            a.read_slice(&mut pa, gpa).expect("read source page");
            b.read_slice(&mut pb, gpa).expect("read destination page");
            assert!(pa == pb, "page at gpa {:#x} differs", gpa.0);
            pages += 1;
        }
    }
    assert!(pages > 0);
}

#[test]
fn vm_memory_guest_migrates_into_vm_memory_destination() {
    // The source VMM's memory: two regions with a hole, as a VMM lays out RAM.
    let src_vm = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 16 * MIB),
            (GuestAddress(1 << 32), 16 * MIB),
        ])
        .expect("source vm-memory"),
    );
    let src_mem = Arc::new(GuestMemory::from_vm_memory(src_vm.clone()).expect("share source"));
    livemig::workload::fill(&src_mem, livemig::workload::Content::Mix, 3, 1).expect("fill");
    // Guest writes go through the same mapping the VMM holds.
    let src = Source::start(src_mem.clone(), TrackerKind::Explicit, 16_000_000, 4 << 20);

    // The destination VMM allocates its own vm-memory for the source's layout and
    // lends it to the receiver.
    let dst_vm = Arc::new(vm_memory_for_layout(&src_mem.layout()).expect("destination"));
    let dst_mem = Arc::new(GuestMemory::from_vm_memory(dst_vm.clone()).expect("share dest"));
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").expect("bind");
    let addr = acceptor.local_addr().unwrap().to_string();
    let migration = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(src.dirtier.control()))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Full));
    let receiver = Receiver::new()
        .memory(dst_mem.clone())
        .config(receiver_config());
    let out = migrate(migration, TcpConnector::new(addr), receiver, acceptor);
    let (report, received) = assert_migrated(&src, out);
    assert_eq!(report.tracker_misses, 0);

    // The receiver applied the pages into the destination VMM's own mapping, and
    // hands that memory back.
    let handed_back = received
        .memory
        .vm_memory::<()>()
        .expect("received memory is the destination's vm-memory");
    assert!(Arc::ptr_eq(&handed_back, &dst_vm));
    // The source is paused after the switchover: compare the two VMMs' memories.
    assert_same_vm_memory(&src_vm, &dst_vm);
    // A fresh destination (nothing applied) would differ: the comparison can fail.
    let empty = vm_memory_for_layout(&src_mem.layout()).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    let nonzero = (0..src_mem.total_pages()).find(|&i| {
        src_mem.read_pages(i, &mut page).unwrap();
        page.iter().any(|&b| b != 0)
    });
    let gfn = src_mem
        .gfn_of(nonzero.expect("mixed content has data"))
        .unwrap();
    let mut got = vec![0u8; PAGE_SIZE];
    empty.read_slice(&mut got, GuestAddress(gfn << 12)).unwrap();
    dst_vm
        .read_slice(&mut page, GuestAddress(gfn << 12))
        .unwrap();
    assert_ne!(got, page);
}
