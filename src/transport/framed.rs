//! Writing and reading whole frames on a [`Stream`].

use std::io::{IoSlice, IoSliceMut, Read, Write};

use super::{Direction, Stream, TransportError};
use crate::wire::frame::{AttachmentCaps, RoundEnd};
use crate::wire::{ControlMsg, FrameHeader, FrameKind, FRAME_HEADER_LEN};

/// Write all of `bufs` (vectored), retrying on short writes.
pub fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "wrote zero bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fill all of `bufs` (vectored), failing on EOF.
pub fn read_exact_vectored<R: Read + ?Sized>(
    r: &mut R,
    mut bufs: &mut [IoSliceMut<'_>],
) -> std::io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The encoded header of a frame carrying `meta` and `data`.
fn frame_head(kind: FrameKind, flags: u8, meta: &[u8], data: &[&[u8]]) -> [u8; FRAME_HEADER_LEN] {
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    let mut h = FrameHeader {
        kind,
        flags,
        meta_len: meta.len() as u32,
        data_len: data_len as u32,
        crc: 0,
    };
    let mut crc = {
        let head = h.encode();
        crc32c::crc32c_append(crc32c::crc32c(&head[..12]), meta)
    };
    if kind == FrameKind::Control {
        for d in data {
            crc = crc32c::crc32c_append(crc, d);
        }
    }
    h.crc = crc;
    h.encode()
}

/// Write one frame to `w`; returns the bytes written.
pub fn write_frame(
    w: &mut dyn Write,
    kind: FrameKind,
    flags: u8,
    meta: &[u8],
    data: &[&[u8]],
) -> std::io::Result<u64> {
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    let head = frame_head(kind, flags, meta, data);
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 + data.len());
    slices.push(IoSlice::new(&head));
    if !meta.is_empty() {
        slices.push(IoSlice::new(meta));
    }
    slices.extend(
        data.iter()
            .filter(|d| !d.is_empty())
            .map(|d| IoSlice::new(d)),
    );
    write_all_vectored(w, &mut slices)?;
    Ok((FRAME_HEADER_LEN + meta.len() + data_len) as u64)
}

/// Frame writer over one stream. Counts bytes put on the wire.
#[derive(Debug)]
pub struct FrameWriter {
    stream: Box<dyn Stream>,
    what: &'static str,
    bytes: u64,
    /// Zero-copy sending of guest pages, when enabled and the stream allows it.
    splicer: Option<super::splice::PageSplicer>,
}

impl FrameWriter {
    /// Wrap `stream`; `what` names it in errors ("control", "page").
    pub fn new(stream: Box<dyn Stream>, what: &'static str) -> Self {
        Self {
            stream,
            what,
            bytes: 0,
            splicer: None,
        }
    }

    /// Send guest pages with `vmsplice` + `splice` from now on, if the stream is a
    /// socket that allows it; returns whether it does. See [`super::splice`].
    pub fn enable_splice(&mut self) -> bool {
        if self.splicer.is_none() && self.stream.splice_fd().is_some() {
            self.splicer = super::splice::PageSplicer::new().ok();
        }
        self.splicer.is_some()
    }

    /// Whether guest pages are spliced.
    pub fn splices(&self) -> bool {
        self.splicer.is_some()
    }

    /// Send one frame whose `data` is guest memory: spliced when enabled (the
    /// header and `meta` are copied), written with `writev` otherwise.
    ///
    /// # Safety
    /// As [`super::splice::PageSplicer::send`]: the kernel may read `data` after this
    /// returns, so later changes to it must be harmless to the receiver (guest
    /// memory under dirty tracking, or memory that no longer changes).
    pub unsafe fn send_guest_pages(
        &mut self,
        kind: FrameKind,
        flags: u8,
        meta: &[u8],
        data: &[&[u8]],
    ) -> Result<(), TransportError> {
        let fd = self.stream.splice_fd();
        let (Some(splicer), Some(fd)) = (self.splicer.as_mut(), fd) else {
            return self.send(kind, flags, meta, data);
        };
        let head = frame_head(kind, flags, meta, data);
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { splicer.send(fd, &[&head, meta], data) };
        match r {
            Ok(n) => {
                self.bytes += n;
                Ok(())
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Bytes written so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn stream(&self) -> &dyn Stream {
        &*self.stream
    }

    fn io(&self, e: std::io::Error) -> TransportError {
        TransportError::from_io(self.what, &*self.stream, Direction::Write, e)
    }

    /// Send one frame; `data` may be several slices (e.g. pages straight from memory).
    pub fn send(
        &mut self,
        kind: FrameKind,
        flags: u8,
        meta: &[u8],
        data: &[&[u8]],
    ) -> Result<(), TransportError> {
        let n = write_frame(&mut *self.stream, kind, flags, meta, data).map_err(|e| self.io(e))?;
        self.bytes += n;
        Ok(())
    }

    /// Send a control message with an optional attachment.
    pub fn send_control(
        &mut self,
        msg: &ControlMsg,
        attachment: &[u8],
    ) -> Result<(), TransportError> {
        let meta = msg.encode();
        self.send(FrameKind::Control, 0, &meta, &[attachment])
    }

    /// Send a round-end marker.
    pub fn send_round_end(&mut self, r: RoundEnd) -> Result<(), TransportError> {
        self.send(FrameKind::RoundEnd, 0, &r.encode(), &[])
    }

    /// Flush (no-op for unbuffered streams, kept for buffered ones).
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.stream.flush().map_err(|e| self.io(e))
    }
}

/// Frame reader over one stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: Box<dyn Stream>,
    what: &'static str,
    meta: Vec<u8>,
    bytes: u64,
}

impl FrameReader {
    /// Wrap `stream`.
    pub fn new(stream: Box<dyn Stream>, what: &'static str) -> Self {
        Self {
            stream,
            what,
            meta: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn stream(&self) -> &dyn Stream {
        &*self.stream
    }

    fn io(&self, e: std::io::Error) -> TransportError {
        TransportError::from_io(self.what, &*self.stream, Direction::Read, e)
    }

    fn wire(&self, e: crate::wire::WireError) -> TransportError {
        TransportError::Wire {
            what: self.what,
            source: e,
        }
    }

    /// Read and bound-check the next header.
    pub fn header(&mut self) -> Result<FrameHeader, TransportError> {
        let mut b = [0u8; FRAME_HEADER_LEN];
        self.stream.read_exact(&mut b).map_err(|e| self.io(e))?;
        self.bytes += FRAME_HEADER_LEN as u64;
        FrameHeader::decode(&b).map_err(|e| self.wire(e))
    }

    /// Read the meta section of a non-control frame and verify the checksum.
    pub fn meta(&mut self, h: &FrameHeader) -> Result<&[u8], TransportError> {
        debug_assert_ne!(h.kind, FrameKind::Control);
        self.meta.clear();
        self.meta.resize(h.meta_len as usize, 0); // bounded by FrameHeader::decode
        let mut meta = std::mem::take(&mut self.meta);
        let r = self.stream.read_exact(&mut meta).map_err(|e| self.io(e));
        self.meta = meta;
        r?;
        self.bytes += h.meta_len as u64;
        h.verify(&self.meta, &[]).map_err(|e| self.wire(e))?;
        Ok(&self.meta)
    }

    /// Read a data section into `buf` (resized to `data_len`).
    pub fn data_into(&mut self, h: &FrameHeader, buf: &mut Vec<u8>) -> Result<(), TransportError> {
        buf.clear();
        buf.resize(h.data_len as usize, 0); // bounded by FrameHeader::decode
        self.stream.read_exact(buf).map_err(|e| self.io(e))?;
        self.bytes += h.data_len as u64;
        Ok(())
    }

    /// Read a data section straight into caller memory (scatter).
    pub fn data_vectored(
        &mut self,
        h: &FrameHeader,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<(), TransportError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total != h.data_len as usize {
            return Err(self.wire(crate::wire::WireError::Invalid("data length")));
        }
        self.stream.read_payload(bufs).map_err(|e| self.io(e))?;
        self.bytes += total as u64;
        Ok(())
    }

    /// Send a control message on this (bidirectional) stream.
    pub fn send_control(
        &mut self,
        msg: &ControlMsg,
        attachment: &[u8],
    ) -> Result<(), TransportError> {
        let meta = msg.encode();
        write_frame(
            &mut *self.stream,
            FrameKind::Control,
            0,
            &meta,
            &[attachment],
        )
        .map_err(|e| TransportError::from_io(self.what, &*self.stream, Direction::Write, e))?;
        Ok(())
    }

    /// Give the stream back (e.g. to turn it into a [`FrameWriter`]).
    pub fn into_stream(self) -> Box<dyn Stream> {
        self.stream
    }

    /// Read a whole control frame that carries no attachment (every message but
    /// `Setup` and `DeviceState`); a frame declaring one is refused before its body
    /// is read.
    pub fn control(&mut self) -> Result<(ControlMsg, Vec<u8>), TransportError> {
        self.control_capped(&AttachmentCaps::NONE)
    }

    /// Read a whole control frame whose attachment may be as large as `caps`
    /// allows for its message. The declared length is checked against the phase's
    /// largest cap before anything is read or allocated, the buffers grow only as
    /// bytes arrive, and the message's own cap is checked once it is known.
    pub fn control_capped(
        &mut self,
        caps: &AttachmentCaps,
    ) -> Result<(ControlMsg, Vec<u8>), TransportError> {
        let h = self.header()?;
        if h.kind != FrameKind::Control {
            return Err(self.wire(crate::wire::WireError::Invalid("expected a control frame")));
        }
        self.control_body_capped(&h, caps)
    }

    /// Read the body of a control frame whose header was already read; it may
    /// carry no attachment.
    pub fn control_body(
        &mut self,
        h: &FrameHeader,
    ) -> Result<(ControlMsg, Vec<u8>), TransportError> {
        self.control_body_capped(h, &AttachmentCaps::NONE)
    }

    /// Read the body of a control frame whose header was already read, with its
    /// attachment bounded as in [`FrameReader::control_capped`].
    pub fn control_body_capped(
        &mut self,
        h: &FrameHeader,
        caps: &AttachmentCaps,
    ) -> Result<(ControlMsg, Vec<u8>), TransportError> {
        caps.check_declared(h.data_len).map_err(|e| self.wire(e))?;
        let mut meta = Vec::new();
        read_growing(&mut *self.stream, h.meta_len as usize, &mut meta).map_err(|e| self.io(e))?;
        let mut data = Vec::new();
        read_growing(&mut *self.stream, h.data_len as usize, &mut data).map_err(|e| self.io(e))?;
        self.bytes += h.meta_len as u64 + h.data_len as u64;
        h.verify(&meta, &data).map_err(|e| self.wire(e))?;
        let msg = ControlMsg::decode(&meta).map_err(|e| self.wire(e))?;
        caps.check_message(&msg, data.len())
            .map_err(|e| self.wire(e))?;
        Ok((msg, data))
    }
}

/// Read exactly `len` bytes into `buf` (cleared first), growing it in steps of at
/// most 64 KiB as bytes arrive: a peer that declares a large section and sends
/// little makes the reader hold only what it sent.
fn read_growing(r: &mut dyn Read, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    const STEP: usize = 64 * 1024;
    buf.clear();
    while buf.len() < len {
        let at = buf.len();
        let n = (len - at).min(STEP);
        buf.resize(at + n, 0);
        r.read_exact(&mut buf[at..])?;
    }
    Ok(())
}
