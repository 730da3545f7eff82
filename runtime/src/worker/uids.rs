//! A user and group id of its own for each worker, from a block of ids set aside for them
//! (`worker_uids` in the config, else the worker user's subordinate range in `/etc/subuid` and
//! `/etc/subgid`, which `make install` reserves, as Docker's `userns-remap` does).
//!
//! Workers that share a uid can signal one another and read one another's files: a worker
//! broken by a hostile model file could kill a dedicated tenant's worker, or read the KV
//! blocks another worker wrote to its disk tier. With an id each, the kernel keeps them
//! apart. A worker keeps its id across its replacements (its disk-tier directory stays its
//! own) and, since the id is chosen from a hash of the worker's name, usually across restarts
//! of the daemon too. An id is only given out when no user, group or running process on the
//! host has it.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The lowest id a range may start at: below it lie the ids distributions and systemd hand
/// out themselves (system users, regular users, systemd's dynamic users up to 65519).
pub const MIN_FIRST: u32 = 65_536;
/// Ids at and above 2^31 trip programs that hold them in a signed int.
pub const END: u64 = 1 << 31;
/// Ids a claim looks at before giving up: enough to step past the host's own users.
const MAX_PROBES: u32 = 4096;
/// Largest `/etc/subuid` read: the file has one short line per user.
const MAX_SUBID_FILE: u64 = 1 << 20;

/// A block of ids for workers: `first` up to `first + count - 1`, as uids and as gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UidRange {
    pub first: u32,
    pub count: u32,
}

impl UidRange {
    /// Why this range cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.count == 0 {
            return Some("count is 0: give at least one id per worker".into());
        }
        if self.first < MIN_FIRST {
            return Some(format!(
                "first is {}, below {MIN_FIRST}: the ids under it belong to the host's users and systemd",
                self.first
            ));
        }
        if u64::from(self.first) + u64::from(self.count) > END {
            return Some(format!(
                "{} + {} reaches past 2^31 - 1 ({}), which programs holding ids in a signed int get wrong",
                self.first,
                self.count,
                END - 1
            ));
        }
        None
    }
}

/// Where a block of worker ids came from, and the ids: uids from one range, gids from
/// another of the same length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBlock {
    pub first_uid: u32,
    pub first_gid: u32,
    pub count: u32,
}

impl IdBlock {
    /// The block the config names, else the one `/etc/subuid` and `/etc/subgid` give `user`
    /// (by name or uid); `None` with neither. A range that cannot be used is an error.
    pub fn choose(
        configured: Option<UidRange>,
        user: &str,
        uid: u32,
    ) -> Result<Option<Self>, String> {
        if let Some(range) = configured {
            if let Some(problem) = range.problem() {
                return Err(format!("worker_uids: {problem}"));
            }
            return Ok(Some(Self {
                first_uid: range.first,
                first_gid: range.first,
                count: range.count,
            }));
        }
        let read = |path: &str| -> Option<String> {
            use std::io::Read as _;
            let mut text = String::new();
            std::fs::File::open(path)
                .ok()?
                .take(MAX_SUBID_FILE)
                .read_to_string(&mut text)
                .ok()?;
            Some(text)
        };
        let (Some(subuid), Some(subgid)) = (read("/etc/subuid"), read("/etc/subgid")) else {
            return Ok(None);
        };
        let (Some(uids), Some(gids)) = (
            subordinate_range(&subuid, user, uid),
            subordinate_range(&subgid, user, uid),
        ) else {
            return Ok(None);
        };
        let count = uids.count.min(gids.count);
        for (file, range) in [("/etc/subuid", uids), ("/etc/subgid", gids)] {
            if let Some(problem) = (UidRange { count, ..range }).problem() {
                return Err(format!("{user}'s range in {file}: {problem}"));
            }
        }
        Ok(Some(Self {
            first_uid: uids.first,
            first_gid: gids.first,
            count,
        }))
    }
}

/// The first `user:first:count` line of a subordinate-id file naming `user` or `uid`.
pub fn subordinate_range(text: &str, user: &str, uid: u32) -> Option<UidRange> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (owner, first, count) = (fields.next()?, fields.next()?, fields.next()?);
        if fields.next().is_some() || (owner != user && owner.parse() != Ok(uid)) {
            return None;
        }
        Some(UidRange {
            first: first.parse().ok()?,
            count: count.parse().ok()?,
        })
    })
}

/// The ids workers hold now; each worker takes one with [`WorkerIds::claim`].
#[derive(Debug)]
pub struct WorkerIds {
    block: IdBlock,
    /// Offsets into the block held by live workers.
    held: Mutex<BTreeSet<u32>>,
}

/// A worker's id, given back when the last of its holders (the engine, its respawn thread)
/// lets go.
#[derive(Debug)]
pub struct Lease {
    ids: Arc<WorkerIds>,
    offset: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ids
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.offset);
    }
}

impl WorkerIds {
    pub fn new(block: IdBlock) -> Arc<Self> {
        Arc::new(Self {
            block,
            held: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn block(&self) -> IdBlock {
        self.block
    }

    /// An id for the worker named `worker` (`<pool>/<model>-<device>`) that no other worker,
    /// user, group or process on the host has.
    pub fn claim(self: &Arc<Self>, worker: &str) -> Result<Lease, String> {
        self.claim_with(worker, &HostIds::scan())
    }

    fn claim_with(self: &Arc<Self>, worker: &str, host: &impl IdsInUse) -> Result<Lease, String> {
        let IdBlock {
            first_uid,
            first_gid,
            count,
        } = self.block;
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = preferred_offset(worker, count);
        for step in 0..count.min(MAX_PROBES) {
            // No overflow: count is below 2^31.
            let offset = (start + step) % count;
            let (uid, gid) = (first_uid + offset, first_gid + offset);
            if held.contains(&offset) || host.uid_taken(uid) || host.gid_taken(gid) {
                continue;
            }
            held.insert(offset);
            return Ok(Lease {
                ids: Arc::clone(self),
                offset,
                uid,
                gid,
            });
        }
        Err(format!(
            "no free id for worker {worker:?} among the {} looked at in {}..={} ({} held by workers, the rest by the host's users, groups or processes); widen worker_uids",
            count.min(MAX_PROBES),
            first_uid,
            u64::from(first_uid) + u64::from(count) - 1,
            held.len()
        ))
    }
}

/// Where a worker's search for an id starts: the same for the same name, so a worker usually
/// gets the id it had before a restart.
fn preferred_offset(worker: &str, count: u32) -> u32 {
    let digest = sha2::Sha256::digest(worker.as_bytes());
    let word = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    word % count
}

/// Which ids the host uses.
trait IdsInUse {
    fn uid_taken(&self, uid: u32) -> bool;
    fn gid_taken(&self, gid: u32) -> bool;
}

/// The ids of the host's running processes, read once per claim, and its user and group
/// databases, asked per id.
struct HostIds {
    process_uids: HashSet<u32>,
    process_gids: HashSet<u32>,
}

impl HostIds {
    fn scan() -> Self {
        let mut process_uids = HashSet::new();
        let mut process_gids = HashSet::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self {
                process_uids,
                process_gids,
            };
        };
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
            {
                continue;
            }
            // `status`, not the directory's owner: a process that is not dumpable (our own
            // workers) has its /proc directory owned by root.
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            for line in status.lines() {
                let (into, rest) = if let Some(rest) = line.strip_prefix("Uid:") {
                    (&mut process_uids, rest)
                } else if let Some(rest) = line.strip_prefix("Gid:") {
                    (&mut process_gids, rest)
                } else {
                    continue;
                };
                into.extend(
                    rest.split_whitespace()
                        .filter_map(|id| id.parse::<u32>().ok()),
                );
            }
        }
        Self {
            process_uids,
            process_gids,
        }
    }
}

impl IdsInUse for HostIds {
    fn uid_taken(&self, uid: u32) -> bool {
        use nix::unistd::{Uid, User};
        self.process_uids.contains(&uid) || !matches!(User::from_uid(Uid::from_raw(uid)), Ok(None))
    }
    fn gid_taken(&self, gid: u32) -> bool {
        use nix::unistd::{Gid, Group};
        self.process_gids.contains(&gid) || !matches!(Group::from_gid(Gid::from_raw(gid)), Ok(None))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A host whose taken ids are listed.
    struct Taken(Vec<u32>);
    impl IdsInUse for Taken {
        fn uid_taken(&self, uid: u32) -> bool {
            self.0.contains(&uid)
        }
        fn gid_taken(&self, gid: u32) -> bool {
            self.0.contains(&gid)
        }
    }

    fn block(count: u32) -> IdBlock {
        IdBlock {
            first_uid: 200_000,
            first_gid: 300_000,
            count,
        }
    }

    #[test]
    fn each_worker_gets_its_own_id_and_the_same_name_the_same_id() {
        let ids = WorkerIds::new(block(1000));
        let a = ids.claim_with("_shared/tiny-cpu", &Taken(vec![])).unwrap();
        let b = ids.claim_with("acme/tiny-cpu", &Taken(vec![])).unwrap();
        assert_ne!(a.uid, b.uid);
        assert_eq!(
            a.gid - 300_000,
            a.uid - 200_000,
            "uid and gid at one offset"
        );
        let uid = a.uid;
        drop(a);
        let again = ids.claim_with("_shared/tiny-cpu", &Taken(vec![])).unwrap();
        assert_eq!(
            again.uid, uid,
            "a name comes back to its id once it is free"
        );
    }

    #[test]
    fn ids_the_host_uses_or_workers_hold_are_stepped_over_until_none_is_left() {
        let ids = WorkerIds::new(block(3));
        let start = preferred_offset("w", 3);
        let taken_uid = 200_000 + start;
        let taken_gid = 300_000 + (start + 1) % 3;
        let host = Taken(vec![taken_uid, taken_gid]);
        let lease = ids.claim_with("w", &host).unwrap();
        assert_eq!(lease.uid, 200_000 + (start + 2) % 3);
        let err = ids.claim_with("v", &host).unwrap_err();
        assert!(err.contains("widen worker_uids"), "{err}");
        drop(lease);
        assert!(
            ids.claim_with("v", &host).is_ok(),
            "a released id is free again"
        );
    }

    #[test]
    fn ranges_below_the_hosts_own_ids_or_past_two_to_the_31_are_refused() {
        let ok = UidRange {
            first: 3_400_000,
            count: 1000,
        };
        assert_eq!(ok.problem(), None);
        for bad in [
            UidRange {
                first: 1000,
                count: 10,
            },
            UidRange {
                first: 3_400_000,
                count: 0,
            },
            UidRange {
                first: u32::MAX - 5,
                count: 5,
            },
            UidRange {
                first: (1 << 31) - 10,
                count: 11,
            },
        ] {
            assert!(bad.problem().is_some(), "{bad:?}");
        }
        let err = IdBlock::choose(Some(UidRange { first: 0, count: 5 }), "accel-worker", 999)
            .unwrap_err();
        assert!(err.starts_with("worker_uids:"), "{err}");
    }

    #[test]
    fn a_users_subordinate_range_is_found_by_name_or_uid() {
        let text = "alice:100000:65536\n# a comment\n\nbob:x:5\n998:300000:1000\naccel-worker:400000:65536\n";
        assert_eq!(
            subordinate_range(text, "accel-worker", 998),
            Some(UidRange {
                first: 300_000,
                count: 1000
            }),
            "the first line for the user wins, by uid here"
        );
        assert_eq!(
            subordinate_range(text, "accel-worker", 7),
            Some(UidRange {
                first: 400_000,
                count: 65_536
            })
        );
        assert_eq!(
            subordinate_range(text, "bob", 7),
            None,
            "malformed lines are skipped"
        );
        assert_eq!(subordinate_range(text, "carol", 7), None);
    }

    #[test]
    fn the_hosts_own_users_and_running_processes_are_taken() {
        let host = HostIds::scan();
        let me = nix::unistd::getuid().as_raw();
        assert!(host.uid_taken(me), "this test's own uid runs a process");
        assert!(host.uid_taken(0), "root is a user");
        assert!(host.gid_taken(0), "root is a group");
    }
}
