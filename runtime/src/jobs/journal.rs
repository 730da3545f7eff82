//! A job's journal: an append-only file of framed records, each made durable (`fdatasync`)
//! before `append` returns.
//!
//! Layout: an 8-byte magic, then records of `u32 length (LE) | u32 CRC-32 of the payload (LE) |
//! payload`. A crash or power cut can leave only the last record torn; opening the journal
//! reads records until the first that is short, too long or fails its checksum, truncates the
//! file there and says how much it dropped, so a torn tail is repaired, never a refusal to
//! start. What the records mean is the caller's (see `jobs::Record`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// First bytes of every journal; the digit is the format's version.
const MAGIC: &[u8; 8] = b"ACCELJ1\n";
/// Largest payload a record may hold; a length above it is corruption.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
const FRAME_BYTES: usize = 8;

/// What opening found wrong at the tail and cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Where the valid records end (the file's new length).
    pub valid_bytes: u64,
    /// Bytes dropped after it.
    pub dropped_bytes: u64,
    pub reason: &'static str,
}

/// An open journal, positioned at its end.
#[derive(Debug)]
pub struct Journal {
    file: File,
    len: u64,
}

impl Journal {
    /// Creates a new, empty journal (its directory entry is the caller's to make durable).
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        Ok(Self {
            file,
            len: MAGIC.len() as u64,
        })
    }

    /// Opens a journal, hands each valid record's payload to `visit` in order, and truncates a
    /// torn or corrupt tail.
    pub fn open(path: &Path, mut visit: impl FnMut(&[u8])) -> io::Result<(Self, Option<Repair>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 16, &file);
        let header = MAGIC.len() as u64;
        let mut torn: Option<(&'static str, u64)> = None;
        let mut valid = 0u64;
        if size < header {
            // Torn before its header was whole: nothing was recorded in it.
            torn = Some(("the file is shorter than its header", size));
        } else {
            let mut magic = [0u8; 8];
            reader.read_exact(&mut magic)?;
            if &magic != MAGIC {
                // Not ours (or another version): refused, never truncated.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a job journal of this version (it begins {:?})",
                        path.display(),
                        String::from_utf8_lossy(&magic)
                    ),
                ));
            }
            valid = header;
            let mut payload = Vec::new();
            while valid < size {
                let remaining = size - valid;
                if remaining < FRAME_BYTES as u64 {
                    torn = Some(("a record's header is cut short", remaining));
                    break;
                }
                let mut frame = [0u8; FRAME_BYTES];
                reader.read_exact(&mut frame)?;
                let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
                let sum = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
                if len > MAX_RECORD_BYTES {
                    torn = Some(("a record's length is impossible", remaining));
                    break;
                }
                if (len + FRAME_BYTES) as u64 > remaining {
                    torn = Some(("the last record is cut short", remaining));
                    break;
                }
                payload.resize(len, 0);
                reader.read_exact(&mut payload)?;
                if crc32fast::hash(&payload) != sum {
                    torn = Some(("a record fails its checksum", remaining));
                    break;
                }
                visit(&payload);
                valid += (len + FRAME_BYTES) as u64;
            }
        }
        drop(reader);
        let mut journal = Self { file, len: valid };
        let repair = torn.map(|(reason, dropped)| Repair {
            valid_bytes: valid.max(header),
            dropped_bytes: dropped,
            reason,
        });
        if repair.is_some() {
            if valid == 0 {
                journal.file.set_len(0)?;
                journal.file.seek(SeekFrom::Start(0))?;
                journal.file.write_all(MAGIC)?;
                journal.len = header;
            } else {
                journal.file.set_len(valid)?;
            }
            journal.file.sync_all()?;
        }
        journal.file.seek(SeekFrom::Start(journal.len))?;
        Ok((journal, repair))
    }

    /// Appends one record and makes it durable. On failure (a full disk) the file is cut back
    /// to where it was, so the journal stays a sequence of whole records.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a journal record of {} bytes is over the {MAX_RECORD_BYTES}-byte limit",
                    payload.len()
                ),
            ));
        }
        let mut frame = Vec::with_capacity(FRAME_BYTES + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Bytes in the journal, header included.
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> (Vec<Vec<u8>>, Option<Repair>) {
        let mut seen = Vec::new();
        let (_, repair) = Journal::open(path, |p| seen.push(p.to_vec())).unwrap();
        (seen, repair)
    }

    #[test]
    fn records_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = Journal::create(&path).unwrap();
        for i in 0..100u32 {
            j.append(format!("record {i}").as_bytes()).unwrap();
        }
        j.append(b"").unwrap();
        let (seen, repair) = records(&path);
        assert_eq!(repair, None);
        assert_eq!(seen.len(), 101);
        assert_eq!(seen[42], b"record 42");
        assert!(seen[100].is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = Journal::create(&path).unwrap();
        j.append(b"first").unwrap();
        j.append(b"second record").unwrap();
        let whole = j.bytes();
        let first_end = (MAGIC.len() + FRAME_BYTES + 5) as u64;
        drop(j);
        let bytes = std::fs::read(&path).unwrap();
        // Every cut inside the second record leaves the first, and the journal takes appends.
        for cut in first_end + 1..whole {
            std::fs::write(&path, &bytes[..cut as usize]).unwrap();
            let (seen, repair) = records(&path);
            assert_eq!(seen, [b"first".to_vec()], "cut at {cut}");
            let repair = repair.expect("a cut tail is reported");
            assert_eq!(repair.valid_bytes, first_end);
            assert_eq!(repair.dropped_bytes, cut - first_end);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first_end);
            let (mut j, _) = Journal::open(&path, |_| {}).unwrap();
            j.append(b"third").unwrap();
            assert_eq!(records(&path).0, [b"first".to_vec(), b"third".to_vec()]);
        }
        // Cut inside the header: an empty journal again.
        std::fs::write(&path, &bytes[..3]).unwrap();
        let (seen, repair) = records(&path);
        assert!(seen.is_empty());
        assert!(repair.is_some());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MAGIC.len() as u64);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = Journal::create(&path).unwrap();
        for payload in [&b"one"[..], b"two", b"three"] {
            j.append(payload).unwrap();
        }
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        let second_payload = MAGIC.len() + (FRAME_BYTES + 3) + FRAME_BYTES;
        bytes[second_payload] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let (seen, repair) = records(&path);
        assert_eq!(seen, [b"one".to_vec()]);
        assert_eq!(repair.unwrap().reason, "a record fails its checksum");
    }

    #[test]
    fn an_impossible_length_is_corruption_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 12]);
        std::fs::write(&path, &bytes).unwrap();
        let (seen, repair) = records(&path);
        assert!(seen.is_empty());
        assert_eq!(repair.unwrap().reason, "a record's length is impossible");
    }

    #[test]
    fn a_foreign_file_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        std::fs::write(&path, b"{\"not\": \"a journal\"}\n").unwrap();
        assert!(Journal::open(&path, |_| {}).is_err());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"not\": \"a journal\"}\n".to_vec()
        );
    }
}
