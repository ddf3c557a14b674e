//! Save/restore of KVM vCPU and VM state, and its versioned byte format.
//!
//! Format (all integers little-endian):
//! ```text
//! header   magic "LMKVMST\0" (8 bytes) | format version u16 | kind u16 (1 vCPU, 2 VM) | sections u32
//! section  tag u16 | reserved u16 (0) | length u32 | payload (length bytes)
//! ```
//! Each payload is the kernel UAPI structure (`kvm_regs`, `kvm_sregs`, …) as its
//! exact bytes; the UAPI layouts are ABI-stable on x86-64, so the bytes mean the same
//! on any x86-64 host. Lists (CPUID entries, MSRs) are a concatenation of entries.
//! Decoding rejects a wrong magic, another format version or kind, a truncated
//! header or section, a payload of the wrong size and a missing section, with an
//! error and never a panic. Sections with an unknown tag are skipped (a later minor
//! revision may add state that an older destination can do without).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Magic at the start of every state blob.
pub const STATE_MAGIC: [u8; 8] = *b"LMKVMST\0";
/// Current format version.
pub const STATE_FORMAT_VERSION: u16 = 1;
/// Largest blob accepted (a vCPU is about 11 KiB; this leaves room for big CPUID/MSR lists).
pub const MAX_STATE_BYTES: usize = 1 << 20;

const KIND_VCPU: u16 = 1;
const KIND_VM: u16 = 2;
const HEADER_LEN: usize = 16;

// vCPU section tags (0 is reserved as invalid).
const T_MP_STATE: u16 = 1;
const T_REGS: u16 = 2;
const T_SREGS: u16 = 3;
const T_XSAVE: u16 = 4;
const T_XCRS: u16 = 5;
const T_DEBUGREGS: u16 = 6;
const T_LAPIC: u16 = 7;
const T_TSC_KHZ: u16 = 8;
const T_CPUID: u16 = 9;
const T_MSRS: u16 = 10;
const T_EVENTS: u16 = 11;
// VM section tags.
const T_PIC_MASTER: u16 = 1;
const T_PIC_SLAVE: u16 = 2;
const T_IOAPIC: u16 = 3;
const T_CLOCK: u16 = 4;

/// Errors from saving, restoring or decoding KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// Which ioctl.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The blob does not start with the magic.
    #[error("not a livemig KVM state blob (bad magic)")]
    BadMagic,
    /// The blob's format version is not one this build reads.
    #[error("unsupported KVM state format version {0} (this build reads {STATE_FORMAT_VERSION})")]
    Version(u16),
    /// A vCPU blob was given where a VM blob was expected, or vice versa.
    #[error("KVM state blob of kind {found}, expected {expected}")]
    Kind {
        /// Kind found.
        found: u16,
        /// Kind expected.
        expected: u16,
    },
    /// The blob ends inside the header or a section.
    #[error("KVM state blob truncated at byte {0}")]
    Truncated(usize),
    /// The blob is larger than [`MAX_STATE_BYTES`].
    #[error("KVM state blob of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A section's payload has the wrong size for its structure.
    #[error("section {tag} has {len} bytes, expected {expected}")]
    SectionSize {
        /// Section tag.
        tag: u16,
        /// Length found.
        len: usize,
        /// Length (or entry size) expected.
        expected: usize,
    },
    /// A required section is absent.
    #[error("required section {0} missing")]
    Missing(u16),
    /// A section's content is inconsistent.
    #[error("invalid KVM state: {0}")]
    Invalid(&'static str),
    /// `KVM_SET_MSRS` refused an MSR.
    #[error("KVM_SET_MSRS refused MSR {0:#x}")]
    MsrRefused(u32),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The architectural state of one x86-64 vCPU.
#[derive(Debug)]
pub struct VcpuState {
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB `KVM_GET_XSAVE` area).
    pub xsave: Box<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Guest TSC frequency in kHz (absent if the host cannot report it).
    pub tsc_khz: Option<u32>,
    /// Guest CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs (index, value).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
}

/// The VM-wide in-kernel device state (in-kernel irqchip without PIT).
#[derive(Debug)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` chip ids 0, 1, 2).
    pub irqchips: [kvm_irqchip; 3],
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// The MSR indices of `KVM_GET_MSR_INDEX_LIST` that `vcpu` can read. Do this once at
/// setup: it costs one ioctl per index.
pub fn probe_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut readable = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| StateError::Missing(T_MSRS))?;
        if let Ok(1) = vcpu.get_msrs(&mut one) {
            readable.push(index);
        }
    }
    Ok(readable)
}

impl VcpuState {
    /// Save `vcpu` (paused, with any pending I/O exit completed) in the documented order.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        // Ordering requirements: see the module docs of `crate::kvm`.
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let xsave = Box::new(vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?);
        let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Missing(T_MSRS))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n].to_vec();
        let events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            tsc_khz,
            cpuid,
            msrs,
            events,
        })
    }

    /// Restore into a freshly created `vcpu` (not yet run) in the documented order.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        // Ordering requirements: see the module docs of `crate::kvm`.
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::Missing(T_CPUID))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete legacy 4 KiB `kvm_xsave` (decoded with its
        // exact size or read by `KVM_GET_XSAVE`); `KVM_SET_XSAVE` reads exactly that
        // many bytes. Hosts whose xsave area is larger (AMX) need `KVM_SET_XSAVE2`,
        // which this format does not carry yet.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        if !self.msrs.is_empty() {
            let all = Msrs::from_entries(&self.msrs).map_err(|_| StateError::Missing(T_MSRS))?;
            let n = vcpu.set_msrs(&all).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n < self.msrs.len() {
                // KVM stops at the first refused MSR: continue one at a time.
                for e in &self.msrs[n..] {
                    let one = Msrs::from_entries(std::slice::from_ref(e))
                        .map_err(|_| StateError::Missing(T_MSRS))?;
                    if vcpu.set_msrs(&one).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
                        return Err(StateError::MsrRefused(e.index));
                    }
                }
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Encode in the versioned format.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, KIND_VCPU);
        w.section(T_MP_STATE, self.mp_state.as_bytes());
        w.section(T_REGS, self.regs.as_bytes());
        w.section(T_SREGS, self.sregs.as_bytes());
        w.section(T_XSAVE, self.xsave.as_bytes());
        w.section(T_XCRS, self.xcrs.as_bytes());
        w.section(T_DEBUGREGS, self.debug_regs.as_bytes());
        w.section(T_LAPIC, self.lapic.as_bytes());
        if let Some(khz) = self.tsc_khz {
            w.section(T_TSC_KHZ, &khz.to_le_bytes());
        }
        w.section(T_CPUID, self.cpuid.as_slice().as_bytes());
        w.section(T_MSRS, self.msrs.as_slice().as_bytes());
        w.section(T_EVENTS, self.events.as_bytes());
        w.finish();
    }

    /// Decode a blob made by [`VcpuState::encode`].
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let r = Reader::parse(blob, KIND_VCPU)?;
        Ok(Self {
            mp_state: r.one(T_MP_STATE)?,
            regs: r.one(T_REGS)?,
            sregs: r.one(T_SREGS)?,
            xsave: Box::new(r.one(T_XSAVE)?),
            xcrs: r.one(T_XCRS)?,
            debug_regs: r.one(T_DEBUGREGS)?,
            lapic: r.one(T_LAPIC)?,
            tsc_khz: r
                .optional(T_TSC_KHZ)
                .map(|_| r.one::<u32>(T_TSC_KHZ))
                .transpose()?,
            cpuid: r.list(T_CPUID)?,
            msrs: r.list(T_MSRS)?,
            events: r.one(T_EVENTS)?,
        })
    }
}

impl VmState {
    /// Save the VM's in-kernel devices (guest paused).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = [
            kvm_irqchip::default(),
            kvm_irqchip::default(),
            kvm_irqchip::default(),
        ];
        for (chip, id) in irqchips.iter_mut().zip([
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]) {
            chip.chip_id = id;
            vm.get_irqchip(chip).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        }
        // Ordering requirements: see `crate::kvm` (irqchips, then the clock).
        let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(Self { irqchips, clock })
    }

    /// Restore into a VM with an in-kernel irqchip (before its vCPUs are restored).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        // KVM_SET_CLOCK accepts no flags from GET_CLOCK (TSC_STABLE, REALTIME, …)
        // unless their extra fields are meant to be used: restore the plain value.
        let clock = kvm_clock_data {
            flags: 0,
            ..self.clock
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Encode in the versioned format.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, KIND_VM);
        for (chip, tag) in self
            .irqchips
            .iter()
            .zip([T_PIC_MASTER, T_PIC_SLAVE, T_IOAPIC])
        {
            w.section(tag, chip.as_bytes());
        }
        w.section(T_CLOCK, self.clock.as_bytes());
        w.finish();
    }

    /// Decode a blob made by [`VmState::encode`].
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let r = Reader::parse(blob, KIND_VM)?;
        let irqchips = [r.one(T_PIC_MASTER)?, r.one(T_PIC_SLAVE)?, r.one(T_IOAPIC)?];
        for (chip, id) in irqchips.iter().zip([
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]) {
            let chip: &kvm_irqchip = chip;
            if chip.chip_id != id {
                return Err(StateError::Invalid("irqchip section holds another chip id"));
            }
        }
        Ok(Self {
            irqchips,
            clock: r.one(T_CLOCK)?,
        })
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    count_at: usize,
    count: u32,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut Vec<u8>, kind: u16) -> Self {
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        Self {
            out,
            count_at,
            count: 0,
        }
    }

    fn section(&mut self, tag: u16, payload: &[u8]) {
        self.out.extend_from_slice(&tag.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.extend_from_slice(payload);
        self.count += 1;
    }

    fn finish(self) {
        self.out[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
    }
}

struct Reader<'a> {
    sections: Vec<(u16, &'a [u8])>,
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, StateError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(StateError::Truncated(b.len()))
}

fn le_u32(b: &[u8], at: usize) -> Result<u32, StateError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(StateError::Truncated(b.len()))
}

impl<'a> Reader<'a> {
    fn parse(blob: &'a [u8], kind: u16) -> Result<Self, StateError> {
        if blob.len() > MAX_STATE_BYTES {
            return Err(StateError::TooLarge(blob.len()));
        }
        if blob.len() < HEADER_LEN {
            if blob.len() >= 8 && blob[..8] != STATE_MAGIC {
                return Err(StateError::BadMagic);
            }
            return Err(StateError::Truncated(blob.len()));
        }
        if blob[..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = le_u16(blob, 8)?;
        if version != STATE_FORMAT_VERSION {
            return Err(StateError::Version(version));
        }
        let found = le_u16(blob, 10)?;
        if found != kind {
            return Err(StateError::Kind {
                found,
                expected: kind,
            });
        }
        let count = le_u32(blob, 12)?;
        let mut at = HEADER_LEN;
        let mut sections = Vec::new();
        for _ in 0..count {
            let tag = le_u16(blob, at)?;
            let len = le_u32(blob, at + 4)? as usize;
            let start = at + 8;
            let payload = start
                .checked_add(len)
                .and_then(|end| blob.get(start..end))
                .ok_or(StateError::Truncated(blob.len()))?;
            sections.push((tag, payload));
            at = start + len;
        }
        if at != blob.len() {
            return Err(StateError::Truncated(at));
        }
        Ok(Self { sections })
    }

    fn optional(&self, tag: u16) -> Option<&'a [u8]> {
        self.sections.iter().find(|s| s.0 == tag).map(|s| s.1)
    }

    fn one<T: FromBytes + Immutable>(&self, tag: u16) -> Result<T, StateError> {
        let bytes = self.optional(tag).ok_or(StateError::Missing(tag))?;
        T::read_from_bytes(bytes).map_err(|_| StateError::SectionSize {
            tag,
            len: bytes.len(),
            expected: std::mem::size_of::<T>(),
        })
    }

    fn list<T: FromBytes + Immutable>(&self, tag: u16) -> Result<Vec<T>, StateError> {
        let bytes = self.optional(tag).ok_or(StateError::Missing(tag))?;
        let size = std::mem::size_of::<T>();
        if bytes.len() % size != 0 {
            return Err(StateError::SectionSize {
                tag,
                len: bytes.len(),
                expected: size,
            });
        }
        bytes
            .chunks_exact(size)
            .map(|c| {
                T::read_from_bytes(c).map_err(|_| StateError::SectionSize {
                    tag,
                    len: c.len(),
                    expected: size,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_vm() -> VmState {
        let mut irqchips = [
            kvm_irqchip::default(),
            kvm_irqchip::default(),
            kvm_irqchip::default(),
        ];
        for (i, c) in irqchips.iter_mut().enumerate() {
            c.chip_id = i as u32;
        }
        VmState {
            irqchips,
            clock: kvm_clock_data {
                clock: 12345,
                ..Default::default()
            },
        }
    }

    #[test]
    fn vm_round_trip_and_rejections() {
        let mut blob = Vec::new();
        sample_vm().encode(&mut blob);
        let back = VmState::decode(&blob).unwrap();
        assert_eq!(back.clock.clock, 12345);
        assert_eq!(back.irqchips[2].chip_id, 2);

        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert!(matches!(VmState::decode(&bad), Err(StateError::BadMagic)));
        let mut bad = blob.clone();
        bad[8] = 9;
        assert!(matches!(VmState::decode(&bad), Err(StateError::Version(9))));
        for cut in [0, 5, 15, 17, blob.len() - 1] {
            assert!(VmState::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            VcpuState::decode(&blob),
            Err(StateError::Kind { .. })
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(VmState::decode(&longer).is_err());
    }
}
