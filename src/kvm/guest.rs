//! A tiny long-mode test guest that checks its own memory: for the KVM example VMM,
//! the KVM tracker tests and hypervisor authors' own migration tests.
//!
//! The guest loops over a working set of pages. Pass `p` (from 0) stores a global
//! counter into the first qword of every page after checking that the page still
//! holds what pass `p-1` stored there (0 on pass 0). After each pass it reports the
//! pass number with `out` [`PORT_PASS`]; a page holding anything else (a page lost
//! or stale after migration) is reported with `out` [`PORT_STALE`] (the page's
//! address), followed by `hlt`. Integer instructions only: on kvm-pvm hosts SSE in a
//! CPL0 guest fails in KVM's instruction emulator.
//!
//! Inputs are registers: r12 = working-set base, r13 = pages, r14 = stride in bytes,
//! r15 = busy-wait iterations per page (throttles the dirty rate). State: r8 = number
//! of stores so far, r9 = passes completed, so after every pass `r8 == r9 * pages`.
//!
//! Guest-physical layout: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 (an identity
//! map of the first 1 GiB with 2 MiB pages), GDT at 0x4000, code at [`CODE_GPA`],
//! working set from [`WORKSET_GPA`].

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::{GuestRegion, MemoryError};

/// Port of the per-pass report (`eax` = passes completed).
pub const PORT_PASS: u16 = 0x10;
/// Port of the stale-page report (`eax` = low 32 bits of the page's address).
pub const PORT_STALE: u16 = 0x11;
/// Where the code is loaded (and where execution starts).
pub const CODE_GPA: u64 = 0x8000;
/// Start of the working set.
pub const WORKSET_GPA: u64 = 2 << 20;
/// Memory the identity map covers (the working set must end below it).
pub const MAPPED_BYTES: u64 = 1 << 30;

const PML4_GPA: u64 = 0x1000;
const PDPT_GPA: u64 = 0x2000;
const PD_GPA: u64 = 0x3000;
const GDT_GPA: u64 = 0x4000;

std::arch::global_asm!(
    ".pushsection .text.livemig_guest, \"ax\"",
    ".globl livemig_guest_start",
    ".globl livemig_guest_end",
    "livemig_guest_start:",
    "2:",
    "mov rdi, r12",
    "mov rcx, r13",
    "3:",
    "inc r8",
    "mov rax, r8",
    "sub rax, r13",
    "test r9, r9",
    "jnz 4f",
    "xor eax, eax",
    "4:",
    "cmp qword ptr [rdi], rax",
    "jne 6f",
    "mov qword ptr [rdi], r8",
    "mov rdx, r15",
    "5:",
    "test rdx, rdx",
    "jz 7f",
    "dec rdx",
    "jmp 5b",
    "7:",
    "add rdi, r14",
    "dec rcx",
    "jnz 3b",
    "inc r9",
    "mov eax, r9d",
    "out 0x10, eax",
    "jmp 2b",
    "6:",
    "mov eax, edi",
    "out 0x11, eax",
    "hlt",
    "jmp 6b",
    "livemig_guest_end:",
    ".popsection",
);

extern "C" {
    static livemig_guest_start: u8;
    static livemig_guest_end: u8;
}

/// The guest's machine code (position independent).
pub fn code() -> &'static [u8] {
    let start = &raw const livemig_guest_start;
    let end = &raw const livemig_guest_end;
    let len = end as usize - start as usize;
    // SAFETY: both symbols are defined by the `global_asm!` block above, in the same
    // section, `end` after `start`; the bytes between them are the assembled code,
    // which is mapped readable for the life of the program.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// Write page tables, GDT and code into `low` (the region at gpa 0, at least 64 KiB).
pub fn write_boot_image(low: &GuestRegion) -> Result<(), MemoryError> {
    if low.gpa() != 0 {
        return Err(MemoryError::NoRegion(0));
    }
    low.write_u64(PML4_GPA as usize, PDPT_GPA | 0x3)?;
    low.write_u64(PDPT_GPA as usize, PD_GPA | 0x3)?;
    for i in 0..512u64 {
        // Present | writable | 2 MiB page.
        low.write_u64((PD_GPA + i * 8) as usize, (i << 21) | 0x83)?;
    }
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        low.write_u64(GDT_GPA as usize + i * 8, *d)?;
    }
    let code = code();
    let mut page = vec![0u8; crate::PAGE_SIZE];
    page[..code.len()].copy_from_slice(code);
    low.write_pages(CODE_GPA / crate::PAGE_SIZE as u64, &page)
}

/// Long-mode segment and control registers, starting from the vCPU's `base` sregs.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.gdt.base = GDT_GPA;
    s.gdt.limit = 23;
    // PE | MP | ET | NE | WP | PG
    s.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    // PAE | OSFXSR | OSXMMEXCPT
    s.cr4 = 0x20 | 0x200 | 0x400;
    s.cr3 = PML4_GPA;
    // LME | LMA
    s.efer = 0x100 | 0x400;
    s
}

/// Initial registers: run the loop over `pages` pages from [`WORKSET_GPA`], one store
/// per 4 KiB page, with `spins` busy-wait iterations after each store.
pub fn initial_regs(pages: u64, spins: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rflags: 0x2,
        rsp: CODE_GPA,
        r12: WORKSET_GPA,
        r13: pages,
        r14: crate::PAGE_SIZE as u64,
        r15: spins,
        ..Default::default()
    }
}
