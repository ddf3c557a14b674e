//! Raw userfaultfd interface: `#[repr(C)]` structs and constants
//! transcribed from the kernel uapi (`linux/userfaultfd.h`), and small
//! safe wrappers. Every `unsafe` block of the uffd tracker lives in this file, but for
//! the `PAGEMAP_SCAN` harvest, which lives with the rest of the pagemap interface in
//! `memory::pagemap`.
//!
//! The wrappers take plain addresses. Write-protecting or registering an arbitrary
//! range of our own address space cannot break memory safety (at worst a writer
//! blocks until the range is un-protected), so they are safe functions; the callers
//! only ever pass the ranges of guest-memory regions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// ---- linux/userfaultfd.h -------------------------------------------------------

/// The only userfaultfd API version.
pub const UFFD_API: u64 = 0xAA;

pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_UFFDIO_WRITEPROTECT` bit in `uffdio_register.ioctls`.
pub const UFFDIO_WRITEPROTECT_IOCTL_BIT: u64 = 1 << 0x06;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `userfaultfd(2)` flag: only handle faults from user mode (unprivileged fallback).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes); only the page-fault view of the union is
/// decoded (`arg.pagefault.flags` at offset 8, `.address` at 16).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub flags: u64,
    pub address: u64,
    feat: u64,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

// ---- linux/fs.h (PAGEMAP_SCAN) lives in `memory::pagemap`, shared with the sender --

pub use crate::memory::pagemap::{PageRegion, Pagemap};

// ---- ioctl numbers (asm-generic/ioctl.h) ----------------------------------------

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

const UFFDIO: u64 = 0xAA;
const UFFDIO_API: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x3F,
    std::mem::size_of::<UffdioApi>(),
);
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

/// `ioctl(fd, req, arg)` retried on EINTR.
fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `arg` is a valid, exclusively borrowed `#[repr(C)]` struct whose
        // layout and size match what the kernel expects for `req` (the size is part of
        // the request number, checked by the const assertions above); the kernel only
        // reads/writes within it. `fd` is an open descriptor owned by the caller.
        let rc = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
        if rc >= 0 {
            return Ok(rc);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Open a new non-blocking, close-on-exec userfaultfd: the syscall first, then
    /// the syscall with `UFFD_USER_MODE_ONLY` (allowed when
    /// `vm.unprivileged_userfaultfd=0` for non-root), then `/dev/userfaultfd`.
    pub fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let mut first_err = None;
        for extra in [0, UFFD_USER_MODE_ONLY] {
            // SAFETY: userfaultfd(2) takes one int flag argument and returns a new fd
            // or -1; no memory is passed.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | extra) };
            if fd >= 0 {
                // SAFETY: the syscall just returned this fd; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                return Ok(Self { fd });
            }
            first_err.get_or_insert_with(io::Error::last_os_error);
        }
        if let Ok(dev) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            loop {
                // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as a plain integer
                // argument (no pointer) and returns a new userfaultfd or -1.
                let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
                if fd >= 0 {
                    // SAFETY: the ioctl just returned this fd; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    return Ok(Self { fd });
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
        Err(first_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS)))
    }

    /// The raw descriptor (for poll).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `UFFDIO_API` handshake requesting `features`; returns the features the kernel
    /// reports (with `features == 0`: everything it supports). Can be done only once
    /// per descriptor.
    pub fn api(&self, features: u64) -> io::Result<u64> {
        let mut a = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl_ptr(self.raw(), UFFDIO_API, &mut a)?;
        Ok(a.features)
    }

    /// Register `[start, start+len)` in write-protect mode; returns the ioctl mask.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl_ptr(self.raw(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Unregister a range (also clears its write protection and wakes waiters).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl_ptr(self.raw(), UFFDIO_UNREGISTER, &mut r).map(drop)
    }

    /// Wake threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl_ptr(self.raw(), UFFDIO_WAKE, &mut r).map(drop)
    }

    /// Write-protect (`protect`) or un-protect-and-wake a range. Retries `EAGAIN`
    /// (the address space was changing, e.g. during fork).
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        loop {
            let mut w = UffdioWriteprotect {
                range: UffdioRange { start, len },
                mode,
            };
            match ioctl_ptr(self.raw(), UFFDIO_WRITEPROTECT, &mut w) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                r => return r.map(drop),
            }
        }
    }

    /// Read as many pending messages as fit into `buf` (non-blocking; `Ok(0)` when
    /// none are pending).
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid writable buffer of `size_of_val(buf)` bytes and
            // `UffdMsg` is plain old data for which any byte pattern is valid.
            let n = unsafe {
                libc::read(
                    self.raw(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    std::mem::size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n as usize / std::mem::size_of::<UffdMsg>());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }
}

/// An eventfd used to tell the handler thread to stop.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes an initial value and flags, returns an fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The raw descriptor (for poll).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Make the eventfd readable.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes exactly 8 bytes from a live u64, as eventfd requires.
        let n = unsafe { libc::write(self.raw(), &one as *const u64 as *const libc::c_void, 8) };
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Block until `a` or `b` is readable (or errors/hangs up). Returns (a ready, b ready).
pub fn poll2(a: RawFd, b: RawFd) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the call's duration.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `madvise(MADV_POPULATE_WRITE)`: fault in every page of the range for writing
/// (contents unchanged). Used by sync mode when the kernel cannot write-protect
/// unpopulated pages.
pub fn populate_write(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: the advice only populates page tables of an existing mapping; it does
    // not change the contents or the layout of the address space.
    let rc = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
