//! The supervisor–worker protocol: length-prefixed frames over a Unix stream socket, one
//! request and one reply at a time.
//!
//! A frame is `u32 length (little-endian) | u8 tag | payload`, `length` counting the tag and
//! payload. The worker speaks first (`Hello` with the protocol version); a supervisor that
//! does not speak that version stops it. Small control messages carry JSON; the per-step
//! messages, which carry token ids and logits, are packed little-endian binary. Every length
//! read from the other side is checked against what the frame holds before anything is sized
//! by it: the worker runs a model file's code paths, so it is not trusted more than one.

use std::io::{Read, Write};

use crate::engine::{LogitsWanted, SeqId, StepOutput};

/// The protocol version both sides must speak.
pub const VERSION: u32 = 3;
/// Largest frame either side accepts: a step's logits for hundreds of sequences of a large
/// vocabulary fit, a corrupt length does not make us allocate gigabytes.
pub const MAX_FRAME: usize = 256 << 20;

/// Message tags.
pub mod tag {
    pub const HELLO: u8 = 0x01;
    pub const INIT: u8 = 0x02;
    pub const READY: u8 = 0x03;
    pub const ADD_SEQUENCE: u8 = 0x10;
    pub const SEQUENCE: u8 = 0x11;
    pub const REMOVE_SEQUENCE: u8 = 0x12;
    pub const SWAP_OUT: u8 = 0x13;
    pub const SWAP_IN: u8 = 0x14;
    pub const STEP: u8 = 0x15;
    pub const STEPPED: u8 = 0x16;
    /// A sequence through the prefix cache: scope and tokens in, id and tokens held out.
    pub const ADD_CACHED: u8 = 0x17;
    pub const CACHED_SEQUENCE: u8 = 0x18;
    /// A sequence to the disk tier: its id, whether sealed, and the tenant's file's scope.
    pub const SWAP_OUT_DISK: u8 = 0x19;
    /// The engine's counters (evictions, disk traffic, cold blocks), asked for the metrics.
    pub const COUNTERS: u8 = 0x1a;
    pub const COUNTED: u8 = 0x1b;
    /// What running sequences share through the prefix cache: per sequence, its id, the
    /// blocks an earlier one holds too, and the blocks any other holds.
    pub const SHARING: u8 = 0x1c;
    pub const SHARED: u8 = 0x1d;
    /// How many of a prompt's tokens the device's prefix cache holds for a scope (a look,
    /// holding nothing): scope and tokens in, a count out.
    pub const RESIDENT: u8 = 0x1e;
    pub const RESIDENT_TOKENS: u8 = 0x1f;
    pub const OK: u8 = 0x20;
    pub const ERROR: u8 = 0x21;
    pub const SHUTDOWN: u8 = 0x30;
    pub const RENDER: u8 = 0x40;
    pub const RENDERED: u8 = 0x41;
}

/// Why a frame could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME} accepted")]
    TooBig(usize),
    #[error("empty frame")]
    Empty,
    #[error("expected message {expected:#04x}, got {got:#04x}")]
    Unexpected { expected: u8, got: u8 },
    #[error("malformed message {tag:#04x}: {why}")]
    Malformed { tag: u8, why: String },
}

/// One frame: its tag and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub payload: Vec<u8>,
}

pub fn write_frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> Result<(), ProtoError> {
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(ProtoError::TooBig(len));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = tag;
    out.write_all(&head)?;
    out.write_all(payload)?;
    out.flush()?;
    Ok(())
}

pub fn read_frame(input: &mut impl Read) -> Result<Frame, ProtoError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    if len > MAX_FRAME {
        return Err(ProtoError::TooBig(len));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    let tag = body[0];
    body.remove(0);
    Ok(Frame { tag, payload: body })
}

impl Frame {
    /// This frame's payload if it has the tag expected; an error frame becomes its message.
    pub fn expect(self, expected: u8) -> Result<Vec<u8>, ProtoError> {
        if self.tag == expected {
            Ok(self.payload)
        } else {
            Err(ProtoError::Unexpected {
                expected,
                got: self.tag,
            })
        }
    }
}

/// A little-endian reader over a payload that never reads past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    tag: u8,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(ProtoError::Malformed {
                tag: self.tag,
                why: format!("{n} bytes wanted, {} left", self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of items of `item_bytes` each, checked against what is left.
    fn count(&mut self, item_bytes: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_bytes.max(1)) > self.bytes.len() {
            return Err(ProtoError::Malformed {
                tag: self.tag,
                why: format!("{n} items announced, {} bytes left", self.bytes.len()),
            });
        }
        Ok(n)
    }

    fn done(&self) -> Result<(), ProtoError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed {
                tag: self.tag,
                why: format!("{} bytes left over", self.bytes.len()),
            })
        }
    }
}

pub fn encode_u64(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

pub fn decode_u64(tag: u8, payload: &[u8]) -> Result<u64, ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag,
    };
    let v = c.u64()?;
    c.done()?;
    Ok(v)
}

/// Longest prefix-cache scope (a tenant's name) a message carries.
pub const MAX_SCOPE: usize = 1024;

pub fn encode_add_cached(scope: &str, tokens: &[u32]) -> Vec<u8> {
    let scope = &scope.as_bytes()[..scope.len().min(MAX_SCOPE)];
    let mut out = Vec::with_capacity(8 + scope.len() + tokens.len() * 4);
    out.extend_from_slice(&(scope.len() as u32).to_le_bytes());
    out.extend_from_slice(scope);
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}

pub fn decode_add_cached(payload: &[u8]) -> Result<(String, Vec<u32>), ProtoError> {
    decode_scoped_tokens(tag::ADD_CACHED, payload)
}

/// A scope and tokens, as [`encode_add_cached`] packs them, for message `tag`.
pub fn decode_scoped_tokens(tag: u8, payload: &[u8]) -> Result<(String, Vec<u32>), ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag,
    };
    let n = c.count(1)?;
    if n > MAX_SCOPE {
        return Err(ProtoError::Malformed {
            tag,
            why: format!("a scope of {n} bytes, over {MAX_SCOPE}"),
        });
    }
    let scope = String::from_utf8_lossy(c.take(n)?).into_owned();
    let n = c.count(4)?;
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(c.u32()?);
    }
    c.done()?;
    Ok((scope, tokens))
}

/// `SWAP_OUT_DISK`: the worker's sequence id, whether the blocks are sealed, and the scope
/// (a tenant's name, at most [`MAX_SCOPE`] bytes: a longer one is refused by the caller,
/// never cut, since the scope picks the file).
pub fn encode_swap_out_disk(id: u64, encrypt: bool, scope: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + scope.len());
    out.extend_from_slice(&id.to_le_bytes());
    out.push(u8::from(encrypt));
    out.extend_from_slice(&(scope.len() as u32).to_le_bytes());
    out.extend_from_slice(scope.as_bytes());
    out
}

pub fn decode_swap_out_disk(payload: &[u8]) -> Result<(u64, bool, String), ProtoError> {
    let tag = tag::SWAP_OUT_DISK;
    let mut c = Cursor {
        bytes: payload,
        tag,
    };
    let id = c.u64()?;
    let encrypt = match c.u8()? {
        0 => false,
        1 => true,
        other => {
            return Err(ProtoError::Malformed {
                tag,
                why: format!("sealed is {other}, not 0 or 1"),
            })
        }
    };
    let n = c.count(1)?;
    if n > MAX_SCOPE {
        return Err(ProtoError::Malformed {
            tag,
            why: format!("a scope of {n} bytes, over {MAX_SCOPE}"),
        });
    }
    let scope = std::str::from_utf8(c.take(n)?)
        .map_err(|e| ProtoError::Malformed {
            tag,
            why: format!("the scope is not UTF-8: {e}"),
        })?
        .to_owned();
    c.done()?;
    Ok((id, encrypt, scope))
}

pub fn encode_shared(shares: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + shares.len() * 16);
    out.extend_from_slice(&(shares.len() as u32).to_le_bytes());
    for &(id, borrowed, sharing) in shares {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&borrowed.to_le_bytes());
        out.extend_from_slice(&sharing.to_le_bytes());
    }
    out
}

/// A sharing report of at most `most` sequences (those the worker was given).
pub fn decode_shared(payload: &[u8], most: usize) -> Result<Vec<(u64, u32, u32)>, ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag: tag::SHARED,
    };
    let n = c.count(16)?;
    if n > most {
        return Err(ProtoError::Malformed {
            tag: tag::SHARED,
            why: format!("{n} sequences reported, {most} on the worker"),
        });
    }
    let mut shares = Vec::with_capacity(n);
    for _ in 0..n {
        shares.push((c.u64()?, c.u32()?, c.u32()?));
    }
    c.done()?;
    Ok(shares)
}

pub fn encode_cached_sequence(id: u64, held: u64) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.extend_from_slice(&held.to_le_bytes());
    out
}

pub fn decode_cached_sequence(payload: &[u8]) -> Result<(u64, u64), ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag: tag::CACHED_SEQUENCE,
    };
    let pair = (c.u64()?, c.u64()?);
    c.done()?;
    Ok(pair)
}

/// Most descriptors one message can carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends `files` as descriptors, with one byte of data (a descriptor cannot travel alone).
pub fn send_fds(
    stream: &std::os::unix::net::UnixStream,
    files: &[&std::fs::File],
) -> Result<(), ProtoError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd as _;
    if files.len() > MAX_FDS {
        return Err(ProtoError::Malformed {
            tag: tag::INIT,
            why: format!(
                "{} files, more than the {MAX_FDS} one message can pass",
                files.len()
            ),
        });
    }
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(b"F")],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| ProtoError::Io(e.into()))?;
    Ok(())
}

/// Receives what [`send_fds`] sent: exactly `expected` descriptors, close-on-exec.
pub fn recv_fds(
    stream: &std::os::unix::net::UnixStream,
    expected: usize,
) -> Result<Vec<std::os::fd::OwnedFd>, ProtoError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ProtoError::Io(e.into()))?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| ProtoError::Io(e.into()))? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let malformed = |why: String| ProtoError::Malformed {
        tag: tag::INIT,
        why,
    };
    if msg.bytes != 1 {
        return Err(malformed("no descriptor message".into()));
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(malformed("descriptors were cut off".into()));
    }
    if fds.len() != expected {
        return Err(malformed(format!(
            "{} descriptors for {expected} files",
            fds.len()
        )));
    }
    Ok(fds)
}

/// `Hello`: the worker's protocol version and pid.
pub fn encode_hello(pid: u32) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    out.extend_from_slice(&pid.to_le_bytes());
    out
}

pub fn decode_hello(payload: &[u8]) -> Result<(u32, u32), ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag: tag::HELLO,
    };
    let version = c.u32()?;
    let pid = c.u32()?;
    c.done()?;
    Ok((version, pid))
}

/// A socket read that gives up at a deadline for the whole frame, not per read: a worker
/// trickling a byte at a time cannot hold the device loop.
#[derive(Debug)]
pub struct Deadline<'a> {
    stream: &'a std::os::unix::net::UnixStream,
    deadline: std::time::Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a std::os::unix::net::UnixStream, deadline: std::time::Instant) -> Self {
        Self { stream, deadline }
    }
}

impl std::io::Read for Deadline<'_> {
    /// Past the deadline the error is `TimedOut`, however the socket put it (an expired read
    /// timeout is `WouldBlock` on Linux).
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let late = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer before the deadline",
            )
        };
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        self.stream.set_read_timeout(Some(left))?;
        match std::io::Read::read(&mut self.stream, buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(late())
            }
            other => other,
        }
    }
}

/// One sequence's part of a `Step`, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepItem {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub logits: LogitsWanted,
}

pub fn encode_step(items: &[(SeqId, &[u32], LogitsWanted)]) -> Vec<u8> {
    let tokens: usize = items.iter().map(|(_, t, _)| t.len()).sum();
    let mut out = Vec::with_capacity(4 + items.len() * 13 + tokens * 4);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (seq, tokens, logits) in items {
        out.extend_from_slice(&seq.0.to_le_bytes());
        out.push(u8::from(*logits == LogitsWanted::All));
        out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
        for t in *tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    out
}

pub fn decode_step(payload: &[u8]) -> Result<Vec<StepItem>, ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag: tag::STEP,
    };
    let n = c.count(13)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = SeqId(c.u64()?);
        let logits = if c.u8()? == 1 {
            LogitsWanted::All
        } else {
            LogitsWanted::Last
        };
        let len = c.count(4)?;
        let tokens = c
            .take(len * 4)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        items.push(StepItem {
            seq,
            tokens,
            logits,
        });
    }
    c.done()?;
    Ok(items)
}

pub fn encode_stepped(outputs: &[StepOutput]) -> Vec<u8> {
    let floats: usize = outputs
        .iter()
        .map(|o| o.logits.iter().map(Vec::len).sum::<usize>())
        .sum();
    let mut out = Vec::with_capacity(4 + outputs.len() * 16 + floats * 4);
    out.extend_from_slice(&(outputs.len() as u32).to_le_bytes());
    for o in outputs {
        let cols = o.logits.first().map_or(0, Vec::len);
        out.extend_from_slice(&o.seq.0.to_le_bytes());
        out.extend_from_slice(&(o.logits.len() as u32).to_le_bytes());
        out.extend_from_slice(&(cols as u32).to_le_bytes());
        for row in &o.logits {
            for v in row {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

pub fn decode_stepped(payload: &[u8]) -> Result<Vec<StepOutput>, ProtoError> {
    let mut c = Cursor {
        bytes: payload,
        tag: tag::STEPPED,
    };
    let n = c.count(16)?;
    let mut outputs = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = SeqId(c.u64()?);
        let rows = c.u32()? as usize;
        let cols = c.u32()? as usize;
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(4))
            .filter(|&b| b <= c.bytes.len())
            .ok_or_else(|| ProtoError::Malformed {
                tag: tag::STEPPED,
                why: format!(
                    "{rows}x{cols} logits announced, {} bytes left",
                    c.bytes.len()
                ),
            })?;
        let data = c.take(bytes)?;
        let logits = data
            .chunks_exact(cols.max(1) * 4)
            .take(rows)
            .map(|row| {
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect();
        outputs.push(StepOutput { seq, logits });
    }
    c.done()?;
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_gives_up_at_its_deadline_for_the_whole_frame() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Half a frame, then nothing: the read ends at the deadline, not per byte.
        std::io::Write::write_all(&mut b, &[10, 0, 0, 0, tag::OK]).unwrap();
        let started = std::time::Instant::now();
        let deadline = started + std::time::Duration::from_millis(100);
        let err = read_frame(&mut Deadline::new(&a, deadline)).unwrap_err();
        assert!(
            matches!(&err, ProtoError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn descriptors_travel_with_their_count_checked() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "weights").unwrap();
        let opened = [
            std::fs::File::open(&path).unwrap(),
            std::fs::File::open(&path).unwrap(),
        ];
        let files: Vec<&std::fs::File> = opened.iter().collect();
        send_fds(&a, &files).unwrap();
        let got = recv_fds(&b, 2).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::fs::File::from(got.into_iter().next().unwrap()),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "weights");
        send_fds(&a, &files[..1]).unwrap();
        assert!(
            recv_fds(&b, 2).is_err(),
            "one descriptor where two were announced"
        );
    }

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, tag::STEP, b"abc").unwrap();
        write_frame(&mut wire, tag::OK, b"").unwrap();
        let mut input = wire.as_slice();
        assert_eq!(
            read_frame(&mut input).unwrap(),
            Frame {
                tag: tag::STEP,
                payload: b"abc".to_vec()
            }
        );
        assert_eq!(read_frame(&mut input).unwrap().tag, tag::OK);
        assert!(matches!(
            read_frame(&mut input),
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(ProtoError::TooBig(_))
        ));
        assert!(matches!(
            read_frame(&mut [0u8; 4].as_slice()),
            Err(ProtoError::Empty)
        ));
    }

    #[test]
    fn steps_and_their_logits_round_trip() {
        let a = [1u32, 2, 3];
        let b = [40_000u32];
        let items = decode_step(&encode_step(&[
            (SeqId(7), &a, LogitsWanted::Last),
            (SeqId(9), &b, LogitsWanted::All),
        ]))
        .unwrap();
        assert_eq!(items[0].tokens, a);
        assert_eq!(items[1].seq, SeqId(9));
        assert_eq!(items[1].logits, LogitsWanted::All);
        let outputs = vec![
            StepOutput {
                seq: SeqId(7),
                logits: vec![vec![0.5, -1.25, f32::MIN]],
            },
            StepOutput {
                seq: SeqId(9),
                logits: vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]],
            },
        ];
        let back = decode_stepped(&encode_stepped(&outputs)).unwrap();
        assert_eq!(back[0].logits, outputs[0].logits);
        assert_eq!(back[1].logits, outputs[1].logits);
    }

    #[test]
    fn a_swap_to_disk_round_trips_and_a_bad_one_is_refused() {
        let payload = encode_swap_out_disk(7, true, "acme");
        assert_eq!(
            decode_swap_out_disk(&payload).unwrap(),
            (7, true, "acme".to_owned())
        );
        let mut bad = payload.clone();
        bad[8] = 2;
        assert!(decode_swap_out_disk(&bad)
            .unwrap_err()
            .to_string()
            .contains("sealed is 2"));
        let long = encode_swap_out_disk(7, false, &"x".repeat(MAX_SCOPE + 1));
        assert!(decode_swap_out_disk(&long)
            .unwrap_err()
            .to_string()
            .contains("over 1024"));
        let mut not_utf8 = encode_swap_out_disk(7, false, "ab");
        let end = not_utf8.len() - 1;
        not_utf8[end] = 0xff;
        assert!(decode_swap_out_disk(&not_utf8).is_err());
        let mut extra = payload;
        extra.push(0);
        assert!(decode_swap_out_disk(&extra).is_err());
    }

    #[test]
    fn sharing_reports_round_trip_and_lying_counts_are_refused() {
        let shares = [(3, 0, 2), (9, 2, 2)];
        assert_eq!(decode_shared(&encode_shared(&shares), 2).unwrap(), shares);
        assert!(
            decode_shared(&encode_shared(&shares), 1).is_err(),
            "more than it holds"
        );
        let mut lie = encode_shared(&shares);
        lie[..4].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(decode_shared(&lie, usize::MAX).is_err());
        let mut extra = encode_shared(&shares);
        extra.push(0);
        assert!(decode_shared(&extra, 2).is_err());
    }

    #[test]
    fn lying_counts_are_refused_before_anything_is_sized_by_them() {
        // A million sequences announced in a 4-byte payload.
        let err = decode_step(&1_000_000u32.to_le_bytes()).unwrap_err();
        assert!(err.to_string().contains("1000000 items announced"), "{err}");
        // Logits of 2^31 x 2^31 floats.
        let mut lie = 1u32.to_le_bytes().to_vec();
        lie.extend_from_slice(&7u64.to_le_bytes());
        lie.extend_from_slice(&(1u32 << 31).to_le_bytes());
        lie.extend_from_slice(&(1u32 << 31).to_le_bytes());
        let err = decode_stepped(&lie).unwrap_err();
        assert!(err.to_string().contains("logits announced"), "{err}");
        // Trailing bytes are an error too.
        let mut long = encode_hello(5);
        long.push(0);
        assert!(decode_hello(&long).is_err());
        assert_eq!(decode_hello(&encode_hello(5)).unwrap(), (VERSION, 5));
        let tokens = [1u32, 2, 70_000];
        assert_eq!(
            decode_add_cached(&encode_add_cached("alpha", &tokens)).unwrap(),
            ("alpha".to_owned(), tokens.to_vec())
        );
        assert_eq!(
            decode_cached_sequence(&encode_cached_sequence(7, 32)).unwrap(),
            (7, 32)
        );
        // A count past the payload, or a scope over the limit, is refused before any sizing.
        let mut lying = encode_add_cached("a", &tokens);
        lying[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_add_cached(&lying).is_err());
        let mut long = ((MAX_SCOPE + 1) as u32).to_le_bytes().to_vec();
        long.extend(vec![b'x'; MAX_SCOPE + 1]);
        long.extend(0u32.to_le_bytes());
        assert!(decode_add_cached(&long).is_err());
    }
}
