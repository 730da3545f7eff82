//! The disk tier of the KV hierarchy: swapped-out blocks kept in files under a directory the
//! daemon owns (a local NVMe, ideally), one file per tenant, read and written with io_uring.
//!
//! Each tenant's blocks live in a file of its own, mode 0600, named by a hash of the tenant's
//! name (names come from the policy and are not trusted as paths). A file's space is allocated
//! 64 slots ahead of its writes (`fallocate`), freed slots are reused, and the file is removed
//! when its last block is freed; the directory's
//! leftovers from a crash are removed when a tier opens it ([`DiskTier::open`]). Slots are the
//! block's bytes rounded up to 4 KiB so that files can be opened with `O_DIRECT` (bypassing
//! the page cache, as a swap device does) where the filesystem allows it; tmpfs does not, and
//! then the file is written through the page cache.
//!
//! I/O goes through page-aligned buffers registered with the ring: a batch of block writes or
//! reads is filled, submitted with one system call, and reaped together. Where the kernel
//! refuses io_uring (disabled by sysctl, or a seccomp filter), plain `pwrite`/`pread` on the
//! same buffers take over, with a log line.
//!
//! A tenant may ask for encryption at rest: each write says whether its blocks are sealed, with
//! AES-256-GCM under the file's key, generated when the file's first sealed block is written
//! and held only in this process's memory, with a fresh nonce per write (a counter of the
//! tier, so never reused under one key). The nonce and tag stay
//! in memory beside the block's slot, and the slot's number is bound as associated data, so a
//! block changed, replaced or moved on disk fails authentication and is never returned.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use io_uring::{opcode, types, IoUring};
use nix::libc;
use sha2::{Digest, Sha256};

/// The alignment `O_DIRECT` asks of offsets, lengths and buffers on every common filesystem.
pub const ALIGN: usize = 4096;

/// The open flag that bypasses the page cache (for peers measured against the tier).
pub const O_DIRECT: i32 = libc::O_DIRECT;

/// Blocks one submission carries at most (the registered buffers).
pub const DEFAULT_BATCH: usize = 16;

/// What went wrong in the disk tier. An error leaves the sequence where it was (a write) or
/// tells the caller to recompute it (a read); it never returns wrong bytes.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("the disk tier needs {needed} more blocks but only {free} are free")]
    Full { needed: usize, free: usize },
    #[error("the disk tier could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a KV block read back from {path} failed authentication (changed on disk)")]
    Tampered { path: PathBuf },
    #[error("a disk tier block of {block_bytes} bytes is too large (at most {max} bytes)")]
    BlockTooLarge { block_bytes: usize, max: usize },
}

impl DiskError {
    /// Whether the disk was full (`ENOSPC` or over quota), as opposed to failing.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            DiskError::Full { .. } => true,
            DiskError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// A sequence's blocks in the disk tier, in order. Only the tier that made it may free it.
#[derive(Debug)]
pub struct DiskBlocks {
    file: FileKey,
    slots: Vec<u32>,
    /// Each slot's nonce and tag when the tenant's blocks are sealed.
    seals: Vec<Option<Seal>>,
}

impl DiskBlocks {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct Seal {
    nonce: u64,
    tag: [u8; 16],
}

/// A tenant's file: the hash of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey([u8; 16]);

impl FileKey {
    fn of(scope: &str) -> Self {
        let digest = Sha256::digest(scope.as_bytes());
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        FileKey(key)
    }

    fn file_name(&self) -> String {
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.kv")
    }
}

struct TenantFile {
    file: File,
    path: PathBuf,
    /// Slots freed and not yet reused, and the next never-used slot.
    free: Vec<u32>,
    next: u32,
    /// Slots the file has space allocated for (grown ahead of writes, as fio does by default:
    /// a direct write inside the file's size need not extend it, which ext4 serialises).
    allocated: u32,
    held: usize,
    cipher: Option<Aes256Gcm>,
}

/// Counters of one tier's traffic, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub blocks_written: u64,
    pub blocks_read: u64,
    /// Blocks that failed authentication when read back.
    pub auth_failures: u64,
    /// Reads and writes the kernel failed (ENOSPC included).
    pub io_errors: u64,
}

/// Page-aligned memory for `O_DIRECT` I/O, freed on drop.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self/&mut self.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(bytes: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(ALIGN), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Self { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout, freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A directory of tenant files holding swapped-out KV blocks, at most `capacity` blocks in all.
pub struct DiskTier {
    dir: PathBuf,
    block_bytes: usize,
    slot_bytes: usize,
    capacity: usize,
    used: usize,
    files: HashMap<FileKey, TenantFile>,
    /// `batch` slots of page-aligned memory, registered with the ring when it has one.
    buffers: AlignedBuf,
    batch: usize,
    ring: Option<IoUring>,
    registered: bool,
    direct: bool,
    next_nonce: u64,
    /// Tags each submission's completions.
    generation: u64,
    stats: DiskStats,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("io_uring", &self.ring.is_some())
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// Largest block the tier takes (a slot must fit one I/O's `u32` length).
const MAX_BLOCK_BYTES: usize = 1 << 30;

impl DiskTier {
    /// Opens (creating, mode 0700) `dir` for blocks of `block_bytes`, at most `capacity` of
    /// them, moving `batch` blocks per submission; removes the `.kv` files a crashed run left.
    pub fn open(
        dir: &Path,
        block_bytes: usize,
        capacity: usize,
        batch: usize,
    ) -> Result<Self, DiskError> {
        if block_bytes == 0 || block_bytes > MAX_BLOCK_BYTES {
            return Err(DiskError::BlockTooLarge {
                block_bytes,
                max: MAX_BLOCK_BYTES,
            });
        }
        let io = |op, source| DiskError::Io {
            op,
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create", e))?;
        check_own_dir(dir).map_err(|e| io("use", e))?;
        remove_leftovers(dir).map_err(|e| io("clean", e))?;
        let slot_bytes = block_bytes.div_ceil(ALIGN) * ALIGN;
        let batch = batch.clamp(1, 64);
        let buffers = AlignedBuf::new(slot_bytes * batch).ok_or_else(|| {
            io(
                "allocate buffers for",
                io::Error::from(io::ErrorKind::OutOfMemory),
            )
        })?;
        let mut tier = Self {
            dir: dir.to_path_buf(),
            block_bytes,
            slot_bytes,
            capacity,
            used: 0,
            files: HashMap::new(),
            buffers,
            batch,
            ring: None,
            registered: false,
            direct: supports_direct(dir),
            next_nonce: 0,
            generation: 0,
            stats: DiskStats::default(),
        };
        tier.start_ring();
        Ok(tier)
    }

    fn start_ring(&mut self) {
        let ring = match IoUring::new((self.batch as u32).next_power_of_two()) {
            Ok(ring) => ring,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(),
                    "io_uring is not available; the disk tier uses pread and pwrite");
                return;
            }
        };
        let buf = self.buffers.as_mut_slice();
        let iovecs: Vec<libc::iovec> = buf
            .chunks_exact_mut(self.slot_bytes)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        // SAFETY: the iovecs point into self.buffers, which lives as long as the ring (both are
        // fields of self; the ring is dropped first in Drop, unregistering them).
        self.registered = unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| tracing::debug!(error = %e, "registering disk tier buffers"))
            .is_ok();
        self.ring = Some(ring);
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn free_blocks(&self) -> usize {
        self.capacity - self.used
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Whether its files bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether its I/O goes through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `scope`'s blocks are kept (whether or not it has any now).
    pub fn path_of(&self, scope: &str) -> PathBuf {
        self.dir.join(FileKey::of(scope).file_name())
    }

    /// Writes `n` blocks for `scope` (sealed when `encrypt`), `fill(i, buf)` copying all of
    /// block `i`'s `block_bytes` into `buf`. If `fill` fails, the write stops there and its error is
    /// returned inside; on any error nothing is kept and every slot is freed.
    pub fn write<E>(
        &mut self,
        scope: &str,
        encrypt: bool,
        n: usize,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Result<DiskBlocks, E>, DiskError> {
        if n > self.free_blocks() {
            return Err(DiskError::Full {
                needed: n,
                free: self.free_blocks(),
            });
        }
        let key = FileKey::of(scope);
        self.file_for(key, encrypt)?;
        let mut blocks = DiskBlocks {
            file: key,
            slots: Vec::with_capacity(n),
            seals: Vec::with_capacity(n),
        };
        {
            let Some(file) = self.files.get_mut(&key) else {
                return Err(self.missing(key));
            };
            for _ in 0..n {
                let slot = file.free.pop().unwrap_or_else(|| {
                    file.next += 1;
                    file.next - 1
                });
                blocks.slots.push(slot);
                blocks.seals.push(None);
            }
            file.held += n;
            if file.next > file.allocated {
                // Grown a batch of 64 slots at a time; a filesystem without fallocate simply
                // extends the file as it writes.
                let slots = file.next.max(file.allocated + 64);
                let len = i64::from(slots) * self.slot_bytes as i64;
                if preallocate(&file.file, len as u64).is_ok() {
                    file.allocated = slots;
                } else {
                    file.allocated = file.next;
                }
            }
        }
        self.used += n;
        for start in (0..n).step_by(self.batch) {
            let count = (n - start).min(self.batch);
            match self.write_batch(&mut blocks, encrypt, start, count, &mut fill) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.free(blocks);
                    return Ok(Err(e));
                }
                Err(e) => {
                    self.free(blocks);
                    return Err(e);
                }
            }
        }
        Ok(Ok(blocks))
    }

    fn write_batch<E>(
        &mut self,
        blocks: &mut DiskBlocks,
        encrypt: bool,
        start: usize,
        count: usize,
        fill: &mut impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, DiskError> {
        let (slot_bytes, block_bytes) = (self.slot_bytes, self.block_bytes);
        let Some(file) = self.files.get(&blocks.file) else {
            return Err(self.missing(blocks.file));
        };
        let cipher = match (encrypt, &file.cipher) {
            (false, _) => None,
            (true, Some(cipher)) => Some(cipher.clone()),
            (true, None) => return Err(self.missing(blocks.file)),
        };
        let buf = self.buffers.as_mut_slice();
        for i in 0..count {
            let (slot_buf, padding) =
                buf[i * slot_bytes..(i + 1) * slot_bytes].split_at_mut(block_bytes);
            // The buffer held another block's bytes, perhaps another tenant's: `fill` writes
            // every byte of the block (or fails, and nothing is written), and the padding
            // past it is cleared here. A sealed block read before was cleared after its read.
            padding.fill(0);
            if let Err(e) = fill(start + i, slot_buf) {
                // What this batch's fills wrote never reaches a file, nor the next fill.
                buf[..(i + 1) * slot_bytes].fill(0);
                return Ok(Err(e));
            }
            if let Some(cipher) = &cipher {
                let nonce = self.next_nonce;
                self.next_nonce += 1;
                let slot = blocks.slots[start + i];
                let tag = cipher
                    .encrypt_in_place_detached(&nonce_bytes(nonce), &slot.to_le_bytes(), slot_buf)
                    .map_err(|_| DiskError::Io {
                        op: "encrypt a block for",
                        path: self.dir.clone(),
                        source: io::Error::other("AES-GCM refused the block"),
                    })?;
                blocks.seals[start + i] = Some(Seal {
                    nonce,
                    tag: tag.into(),
                });
            }
        }
        self.transfer(blocks, start, count, Direction::Write)?;
        self.stats.blocks_written += count as u64;
        self.stats.bytes_written += (count * slot_bytes) as u64;
        Ok(Ok(()))
    }

    /// Reads `blocks` back in order, `drain(i, bytes)` taking block `i`'s `block_bytes`. A
    /// sealed block that fails authentication ends the read with [`DiskError::Tampered`];
    /// `drain` is never given its bytes. The blocks stay on disk (free them with
    /// [`DiskTier::free`]).
    pub fn read<E>(
        &mut self,
        blocks: &DiskBlocks,
        drain: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, DiskError> {
        self.read_from(blocks, 0, drain)
    }

    /// [`DiskTier::read`] of the blocks from `first` on (indices stay those of `blocks`): a
    /// sequence whose first blocks came back another way reads only the rest.
    pub fn read_from<E>(
        &mut self,
        blocks: &DiskBlocks,
        first: usize,
        mut drain: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, DiskError> {
        let n = blocks.slots.len();
        for start in (first.min(n)..n).step_by(self.batch) {
            let count = (n - start).min(self.batch);
            self.transfer(blocks, start, count, Direction::Read)?;
            self.stats.blocks_read += count as u64;
            self.stats.bytes_read += (count * self.slot_bytes) as u64;
            let Some(file) = self.files.get(&blocks.file) else {
                return Err(self.missing(blocks.file));
            };
            let (slot_bytes, block_bytes) = (self.slot_bytes, self.block_bytes);
            let buf = self.buffers.as_mut_slice();
            for i in 0..count {
                let slot_buf = &mut buf[i * slot_bytes..i * slot_bytes + block_bytes];
                let sealed = blocks.seals[start + i];
                if let Some(seal) = sealed {
                    let slot = blocks.slots[start + i];
                    let opened = file.cipher.as_ref().is_some_and(|cipher| {
                        cipher
                            .decrypt_in_place_detached(
                                &nonce_bytes(seal.nonce),
                                &slot.to_le_bytes(),
                                slot_buf,
                                Tag::from_slice(&seal.tag),
                            )
                            .is_ok()
                    });
                    if !opened {
                        self.stats.auth_failures += 1;
                        return Err(DiskError::Tampered {
                            path: file.path.clone(),
                        });
                    }
                }
                let drained = drain(start + i, slot_buf);
                if sealed.is_some() {
                    // Sealed bytes are not left in the clear in the shared buffers.
                    slot_buf.fill(0);
                }
                if let Err(e) = drained {
                    return Ok(Err(e));
                }
            }
        }
        Ok(Ok(()))
    }

    /// Frees a sequence's blocks; a tenant's file goes when its last block does.
    pub fn free(&mut self, blocks: DiskBlocks) {
        let n = blocks.slots.len();
        self.used -= n.min(self.used);
        let Some(file) = self.files.get_mut(&blocks.file) else {
            return;
        };
        file.held -= n.min(file.held);
        if file.held == 0 {
            if let Some(file) = self.files.remove(&blocks.file) {
                if let Err(e) = std::fs::remove_file(&file.path) {
                    tracing::warn!(error = %e, path = %file.path.display(),
                        "removing an empty disk tier file");
                }
            }
        } else {
            file.free.extend(blocks.slots);
        }
    }

    /// Overwrites a byte of a stored block on disk, as an attacker with access to the file
    /// would; for tests of authentication.
    #[doc(hidden)]
    pub fn tamper(&self, blocks: &DiskBlocks, index: usize) -> io::Result<()> {
        let file = self
            .files
            .get(&blocks.file)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // A separate buffered handle: the tier's own may be O_DIRECT.
        let raw = OpenOptions::new().read(true).write(true).open(&file.path)?;
        let offset = u64::from(blocks.slots[index]) * self.slot_bytes as u64;
        let mut byte = [0u8; 1];
        raw.read_exact_at(&mut byte, offset)?;
        byte[0] ^= 0x5a;
        raw.write_all_at(&byte, offset)?;
        raw.sync_all()
    }

    fn missing(&self, key: FileKey) -> DiskError {
        DiskError::Io {
            op: "find",
            path: self.dir.join(key.file_name()),
            source: io::Error::from(io::ErrorKind::NotFound),
        }
    }

    /// Opens (creating) the file of `key`, with a key for sealing once a write asks for one.
    /// The file must not exist (a leftover was removed at open) and is never a link.
    fn file_for(&mut self, key: FileKey, encrypt: bool) -> Result<(), DiskError> {
        if !self.files.contains_key(&key) {
            let path = self.dir.join(key.file_name());
            let mut options = OpenOptions::new();
            options
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | if self.direct { libc::O_DIRECT } else { 0 });
            let file = options.open(&path).map_err(|source| DiskError::Io {
                op: "create",
                path: path.clone(),
                source,
            })?;
            self.files.insert(
                key,
                TenantFile {
                    file,
                    path,
                    free: Vec::new(),
                    next: 0,
                    allocated: 0,
                    held: 0,
                    cipher: None,
                },
            );
        }
        let Some(file) = self.files.get_mut(&key) else {
            return Err(self.missing(key));
        };
        if encrypt && file.cipher.is_none() {
            file.cipher = Some(new_cipher().map_err(|source| DiskError::Io {
                op: "make a key for",
                path: file.path.clone(),
                source,
            })?);
        }
        Ok(())
    }

    /// Moves blocks `start..start + count` between the buffers and their slots.
    fn transfer(
        &mut self,
        blocks: &DiskBlocks,
        start: usize,
        count: usize,
        direction: Direction,
    ) -> Result<(), DiskError> {
        let Some(file) = self.files.get(&blocks.file) else {
            return Err(self.missing(blocks.file));
        };
        let slot_bytes = self.slot_bytes;
        let slots = &blocks.slots[start..start + count];
        self.generation += 1;
        let result = match &mut self.ring {
            Some(ring) => submit(
                ring,
                &file.file,
                self.buffers.as_mut_slice(),
                slot_bytes,
                slots,
                direction,
                self.registered,
                self.generation,
            ),
            None => {
                let buf = self.buffers.as_mut_slice();
                slots
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, &slot)| {
                        let at = u64::from(slot) * slot_bytes as u64;
                        let chunk = &mut buf[i * slot_bytes..(i + 1) * slot_bytes];
                        match direction {
                            Direction::Write => file.file.write_all_at(chunk, at),
                            Direction::Read => file.file.read_exact_at(chunk, at),
                        }
                    })
                    .map_err(SubmitError::Io)
            }
        };
        let path = file.path.clone();
        let source = match result {
            Ok(()) => return Ok(()),
            Err(SubmitError::Io(e)) => e,
            Err(SubmitError::Abandoned(e)) => {
                tracing::error!(error = %e, dir = %self.dir.display(),
                    "io_uring stopped answering; the disk tier goes on with pread and pwrite");
                self.abandon_ring();
                e
            }
        };
        self.stats.io_errors += 1;
        Err(DiskError::Io {
            op: direction.verb(),
            path,
            source,
        })
    }

    /// Stops using a ring that may still have transfers in flight: it is dropped (the kernel
    /// cancels what it can) and its buffers are leaked, never reused, since an abandoned read
    /// could still land in them; fresh ones take their place.
    fn abandon_ring(&mut self) {
        self.ring = None;
        self.registered = false;
        if let Some(fresh) = AlignedBuf::new(self.slot_bytes * self.batch) {
            std::mem::forget(std::mem::replace(&mut self.buffers, fresh));
        }
    }

    /// The bytes of buffer `i` (tests and benches check what a transfer left there).
    #[doc(hidden)]
    pub fn buffer(&self, i: usize) -> &[u8] {
        &self.buffers.as_slice()[i * self.slot_bytes..i * self.slot_bytes + self.block_bytes]
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // The ring goes before the buffers it has registered.
        self.ring = None;
        for (_, file) in self.files.drain() {
            if let Err(e) = std::fs::remove_file(&file.path) {
                tracing::warn!(error = %e, path = %file.path.display(),
                    "removing a disk tier file");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Write,
    Read,
}

impl Direction {
    fn verb(self) -> &'static str {
        match self {
            Direction::Write => "write",
            Direction::Read => "read",
        }
    }
}

/// Why a submission failed.
enum SubmitError {
    /// The transfers failed (or some did); every one was reaped.
    Io(io::Error),
    /// The ring stopped answering with transfers still in flight: it and its buffers must
    /// not be used again.
    Abandoned(io::Error),
}

/// One submission of `slots.len()` block transfers, each from or into its buffer, reaped
/// together; any failed or short transfer fails the batch. Completions are tagged with
/// `generation`, so none from an earlier, abandoned batch is taken for this one's.
#[allow(clippy::too_many_arguments)]
fn submit(
    ring: &mut IoUring,
    file: &File,
    buf: &mut [u8],
    slot_bytes: usize,
    slots: &[u32],
    direction: Direction,
    registered: bool,
    generation: u64,
) -> Result<(), SubmitError> {
    let fd = types::Fd(file.as_raw_fd());
    let len = slot_bytes as u32;
    let tag = |i: usize| (generation << 8) | i as u64;
    for (i, &slot) in slots.iter().enumerate() {
        let ptr = buf[i * slot_bytes..].as_mut_ptr();
        let offset = u64::from(slot) * slot_bytes as u64;
        let entry = match (direction, registered) {
            (Direction::Write, true) => opcode::WriteFixed::new(fd, ptr, len, i as u16)
                .offset(offset)
                .build(),
            (Direction::Write, false) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
            (Direction::Read, true) => opcode::ReadFixed::new(fd, ptr, len, i as u16)
                .offset(offset)
                .build(),
            (Direction::Read, false) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
        }
        .user_data(tag(i));
        // SAFETY: each entry's buffer is a distinct slot of `buf`, which outlives this call;
        // the call reaps every completion before it returns, or reports the ring abandoned
        // (its buffers are then never used or freed again), so no I/O outlives the buffer.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // Nothing pushed so far was submitted: drop them, unsent.
            ring.submission().sync();
            return Err(SubmitError::Abandoned(io::Error::other(
                "the io_uring submission queue is full",
            )));
        }
    }
    let mut reaped = 0;
    let mut first_error = None;
    let mut refusals = 0;
    while reaped < slots.len() {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                refusals += 1;
                if refusals > 100 {
                    return Err(SubmitError::Abandoned(e));
                }
                first_error.get_or_insert(e);
            }
        }
        for cqe in ring.completion() {
            if cqe.user_data() >> 8 != generation {
                continue;
            }
            reaped += 1;
            let result = cqe.result();
            if result < 0 {
                first_error.get_or_insert(io::Error::from_raw_os_error(-result));
            } else if result as u32 != len {
                first_error.get_or_insert(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("a short {} of {result} of {len} bytes", direction.verb()),
                ));
            }
        }
    }
    first_error.map_or(Ok(()), |e| Err(SubmitError::Io(e)))
}

fn nonce_bytes(counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&counter.to_le_bytes());
    Nonce::clone_from_slice(&nonce)
}

fn new_cipher() -> io::Result<Aes256Gcm> {
    use rand::TryRngCore;
    let mut key = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut key)
        .map_err(io::Error::other)?;
    let cipher = Aes256Gcm::new_from_slice(&key).map_err(io::Error::other);
    key.fill(0);
    cipher
}

/// Makes sure `dir` is a directory of this process's user (not a link to elsewhere, which
/// would have the tier write and delete files there), private to it (mode 0700).
fn check_own_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = check_owner(dir)?;
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Whether files in `dir` can be opened with `O_DIRECT` (tmpfs, for one, refuses).
fn supports_direct(dir: &Path) -> bool {
    let probe = dir.join(".direct-probe");
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Allocates space for the first `len` bytes of `file` (and extends it to them), so that
/// direct writes inside it need not grow the file.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(io::Error::other)?;
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len)
        .map_err(io::Error::from)
}

/// Removes the `.kv` files in `dir`: a tier's files are never valid after the process that
/// wrote them is gone (their keys and block tables died with it).
pub fn remove_leftovers(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && name.to_string_lossy().ends_with(".kv") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Under the tier root, the directories of workers' tiers: `workers/<uid>`, one per worker
/// (a worker's uid is its own while it lives).
pub const WORKERS_DIR: &str = "workers";

/// Makes `root/workers/<uid>` afresh for the worker running as `uid`:`gid`, mode 0700 and
/// owned by it, so that only that worker can reach its tenants' files; what was there before
/// (a lost worker's files, perhaps of another pool that had the uid) is removed first.
/// `workers` is root's, passable but not listable (0711). `root` must be a directory others
/// may pass through; one this daemon made private (0700) is opened to passing (0711), and
/// anything else about it is left as the operator set it. Returns the worker's directory.
pub fn prepare_worker_dir(root: &Path, uid: u32, gid: u32) -> io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)?;
    let meta = std::fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    if meta.mode() & 0o001 == 0 {
        let ours = meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0;
        if !ours {
            return Err(io::Error::other(format!(
                "the workers' users cannot pass through {} (mode {:o}); let them (chmod o+x) or choose another kv_disk_dir",
                root.display(),
                meta.mode() & 0o7777
            )));
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    }
    let workers = root.join(WORKERS_DIR);
    match std::fs::DirBuilder::new().mode(0o711).create(&workers) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_owner(&workers)?;
    std::fs::set_permissions(&workers, std::fs::Permissions::from_mode(0o711))?;
    let dir = workers.join(uid.to_string());
    remove_worker_dir(root, uid)?;
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))?;
    Ok(dir)
}

/// Removes the tier directory of the worker that ran as `uid`, with whatever is in it (once
/// the worker is gone: the uid may go to another pool's worker next). Only this daemon's user
/// can write in `workers`, so nothing is swapped in meanwhile; links inside are removed, not
/// followed.
pub fn remove_worker_dir(root: &Path, uid: u32) -> io::Result<()> {
    let dir = root.join(WORKERS_DIR).join(uid.to_string());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => std::fs::remove_file(&dir),
        Err(e) => Err(e),
    }
}

/// Makes sure `dir` is a real directory of this process's user (a link is not followed);
/// returns what it is.
fn check_owner(dir: &Path) -> io::Result<std::fs::Metadata> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a link is not followed)",
            dir.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not this process's uid {me}",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(meta)
}

/// Removes every model's tier files under `root` (the `model-*` directories a daemon makes
/// there), and the directories once empty, and every worker's directory (under `workers/`,
/// wholly the daemon's); returns how many tier files went. Nothing else in `root` is
/// touched.
pub fn remove_stale_tiers(root: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    // The workers' directories first; failing them does not keep the models' from going.
    let workers = remove_worker_dirs(&root.join(WORKERS_DIR));
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let ours = entry.file_name().to_string_lossy().starts_with("model-");
        // Not followed: a link planted here must not lead the daemon to delete elsewhere.
        if ours && entry.file_type()?.is_dir() {
            removed += remove_leftovers(&entry.path())?;
            let _ = std::fs::remove_dir(entry.path());
        }
    }
    Ok(removed + workers?)
}

/// Removes the workers' tier directories under `workers` (wholly the daemon's); returns how
/// many tier files were in them.
fn remove_worker_dirs(workers: &Path) -> io::Result<usize> {
    match std::fs::symlink_metadata(workers) {
        Ok(meta) if meta.file_type().is_dir() => {}
        Ok(_) => {
            std::fs::remove_file(workers)?;
            return Ok(0);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    }
    let mut files = 0;
    for worker in std::fs::read_dir(workers)?.flatten() {
        if worker.file_type().is_ok_and(|t| t.is_dir()) {
            files += std::fs::read_dir(worker.path())
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|f| f.file_name().to_string_lossy().ends_with(".kv"))
                        .count()
                })
                .unwrap_or(0);
        }
    }
    std::fs::remove_dir_all(workers)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn write_filled(tier: &mut DiskTier, scope: &str, n: usize, byte: u8) -> DiskBlocks {
        tier.write(scope, false, n, |_, b| {
            b.fill(byte);
            Ok::<_, ()>(())
        })
        .unwrap()
        .unwrap()
    }

    fn pattern(i: usize, n: usize) -> Vec<u8> {
        (0..n).map(|j| (i * 31 + j * 7) as u8).collect()
    }

    fn round_trip(encrypt: bool) {
        let dir = tempfile::tempdir().unwrap();
        let block = 10_000; // not a multiple of the alignment
        let mut tier = DiskTier::open(dir.path(), block, 64, 4).unwrap();
        let blocks = tier
            .write("tenant-a", encrypt, 10, |i, buf| {
                buf.copy_from_slice(&pattern(i, block));
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(tier.used(), 10);
        let path = tier.path_of("tenant-a");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let on_disk = std::fs::read(&path).unwrap();
        let first_plain = pattern(0, block);
        assert_eq!(on_disk[..block] == first_plain[..], !encrypt);
        let mut seen = 0;
        tier.read(&blocks, |i, bytes| {
            assert_eq!(bytes, pattern(i, block));
            seen += 1;
            Ok::<_, ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(seen, 10);
        tier.free(blocks);
        assert_eq!(tier.used(), 0);
        assert!(!path.exists(), "an empty tenant file is removed");
    }

    #[test]
    fn blocks_come_back_as_written() {
        round_trip(false);
    }

    #[test]
    fn sealed_blocks_come_back_as_written_and_are_not_plain_on_disk() {
        round_trip(true);
    }

    #[test]
    fn a_changed_sealed_block_is_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 4096, 8, 2).unwrap();
        let blocks = tier
            .write("t", true, 3, |i, buf| {
                buf.fill(i as u8 + 1);
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        tier.tamper(&blocks, 2).unwrap();
        let mut drained = Vec::new();
        let err = tier
            .read(&blocks, |i, _| {
                drained.push(i);
                Ok::<_, ()>(())
            })
            .unwrap_err();
        assert!(matches!(err, DiskError::Tampered { .. }), "{err}");
        assert_eq!(drained, [0, 1], "the tampered block is not handed on");
        assert_eq!(tier.stats().auth_failures, 1);
    }

    #[test]
    fn tenants_have_files_of_their_own_and_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 4096, 8, 4).unwrap();
        let a = write_filled(&mut tier, "a", 3, 1);
        let b = write_filled(&mut tier, "b", 2, 2);
        assert_ne!(tier.path_of("a"), tier.path_of("b"));
        let err = tier
            .write("a", false, 4, |_, _| Ok::<_, ()>(()))
            .unwrap_err();
        assert!(
            matches!(err, DiskError::Full { needed: 4, free: 3 }),
            "{err}"
        );
        let a2 = write_filled(&mut tier, "a", 1, 3);
        let len = std::fs::metadata(tier.path_of("a")).unwrap().len();
        tier.free(a);
        let a3 = write_filled(&mut tier, "a", 3, 4);
        // The file did not grow: the three freed slots were reused.
        assert_eq!(std::fs::metadata(tier.path_of("a")).unwrap().len(), len);
        for (blocks, byte) in [(&b, 2u8), (&a2, 3), (&a3, 4)] {
            tier.read(blocks, |_, bytes| {
                assert!(bytes.iter().all(|&x| x == byte));
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        }
        drop(tier);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Each write chooses: a sealed write into a file that already holds plain blocks is
    /// sealed all the same, and both come back.
    #[test]
    fn sealing_is_chosen_per_write_not_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 4096, 8, 2).unwrap();
        let plain = write_filled(&mut tier, "t", 1, 7);
        let sealed = tier
            .write("t", true, 1, |_, b| {
                b.fill(9);
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        let on_disk = std::fs::read(tier.path_of("t")).unwrap();
        assert!(on_disk[..4096].iter().all(|&x| x == 7));
        assert!(
            !on_disk[4096..8192].iter().all(|&x| x == 9),
            "sealed on disk"
        );
        for (blocks, byte) in [(&plain, 7u8), (&sealed, 9)] {
            tier.read(blocks, |_, bytes| {
                assert!(bytes.iter().all(|&x| x == byte));
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        }
    }

    /// A `fill` that fails stops the write: its error comes back, no slot is kept, and the
    /// bytes of an earlier (sealed, decrypted) read never reach the file.
    #[test]
    fn a_failed_fill_keeps_nothing_and_writes_no_stale_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 4096, 8, 4).unwrap();
        let secret = tier
            .write("other", true, 1, |_, b| {
                b.fill(0xAB);
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        tier.read(&secret, |_, _| Ok::<_, ()>(())).unwrap().unwrap();
        let failed = tier
            .write("t", false, 3, |i, b| {
                if i == 1 {
                    return Err("no bytes");
                }
                b.fill(1);
                Ok(())
            })
            .unwrap();
        assert_eq!(failed.unwrap_err(), "no bytes");
        assert_eq!(tier.used(), 1, "only the other tenant's block");
        assert!(!tier.path_of("t").exists());
        // A write whose fill leaves its buffer alone writes zeros, not the last read.
        let blank = tier
            .write("t", false, 1, |_, _| Ok::<_, ()>(()))
            .unwrap()
            .unwrap();
        let on_disk = std::fs::read(tier.path_of("t")).unwrap();
        assert!(on_disk.iter().all(|&x| x == 0));
        tier.free(blank);
    }

    #[test]
    fn a_linked_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep.kv"), b"not the tier's").unwrap();
        let link = dir.path().join("tier");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let err = DiskTier::open(&link, 4096, 1, 1).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(elsewhere.join("keep.kv").exists());
    }

    #[test]
    fn opening_removes_a_crashed_runs_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0011.kv"), b"stale").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"not ours").unwrap();
        let _tier = DiskTier::open(dir.path(), 4096, 1, 1).unwrap();
        assert!(!dir.path().join("0011.kv").exists());
        assert!(dir.path().join("keep.txt").exists());
    }

    #[test]
    fn a_workers_directory_is_made_afresh_for_it_and_removed_at_the_next_start() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let kv = root.path().join("kv");
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        let dir = prepare_worker_dir(&kv, uid, gid).unwrap();
        assert_eq!(dir, kv.join(format!("workers/{uid}")));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!((mode(&kv), mode(&kv.join("workers"))), (0o711, 0o711));
        // What a lost worker left, a link to elsewhere included, goes; elsewhere stays.
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep.kv"), b"not the tier's").unwrap();
        std::fs::write(dir.join("0011.kv"), b"stale").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("link")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let again = prepare_worker_dir(&kv, uid, gid).unwrap();
        assert_eq!(std::fs::read_dir(&again).unwrap().count(), 0);
        assert_eq!(mode(&again), 0o700);
        assert!(elsewhere.join("keep.kv").exists());
        // A root the operator set is left as it is: a sticky, open one is passable already;
        // one closed to others is refused, not opened.
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_worker_dir(&elsewhere, uid, gid).unwrap();
        assert_eq!(mode(&elsewhere), 0o1777);
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o750)).unwrap();
        let err = prepare_worker_dir(&elsewhere, uid, gid).unwrap_err();
        assert!(err.to_string().contains("chmod o+x"), "{err}");
        assert_eq!(mode(&elsewhere), 0o750);
        // A worker gone: its directory goes. A start after a crash removes every worker's
        // directory and counts its tier files; what is not the daemon's stays.
        remove_worker_dir(&kv, uid).unwrap();
        assert!(!again.exists());
        remove_worker_dir(&kv, uid).unwrap();
        let again = prepare_worker_dir(&kv, uid, gid).unwrap();
        std::fs::write(again.join("00aa.kv"), b"stale").unwrap();
        std::fs::create_dir(kv.join("model-m")).unwrap();
        std::fs::write(kv.join("model-m/00bb.kv"), b"stale").unwrap();
        std::fs::write(kv.join("keep.txt"), b"not ours").unwrap();
        assert_eq!(remove_stale_tiers(&kv).unwrap(), 2);
        assert!(!kv.join("workers").exists());
        assert!(kv.join("keep.txt").exists());
    }
}
