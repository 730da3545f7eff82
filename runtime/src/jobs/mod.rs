//! Batch jobs: a tenant's JSONL file of requests (OpenAI's batch input format), answered line
//! by line in the batch class, kept durable across crashes and restarts.
//!
//! Owns the jobs' files and what they mean. Each job is a directory under `state_dir/jobs`:
//! `job.json` (who, when, how many lines; written once), `input.jsonl` (the file as sent),
//! `journal` (every answer and state change, see [`journal`]), and `output.jsonl` /
//! `errors.jsonl`, the answers as they completed. The journal is the truth: an answer is
//! journaled (and `fdatasync`ed) before it is appended to its output file, the output files
//! are rebuilt from the journal at start when they disagree with it, and a line is dispatched
//! only while the journal holds no answer for it, so after any crash every line is answered
//! exactly once. A job is on disk (files and directories synced) before its 201 is sent.
//! Running the lines is [`run`]'s.

pub mod journal;
pub mod run;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use self::journal::Journal;
use crate::config::JobsConfig;

/// Largest `job.json` read back at start.
const MAX_META_BYTES: u64 = 64 << 10;
/// Longest `custom_id` accepted (OpenAI's ids are short; this bounds the id index).
pub const MAX_CUSTOM_ID_BYTES: usize = 512;
/// Uploads read at once: each holds up to `max_file_size` in memory.
const UPLOADS_AT_ONCE: usize = 2;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted; lines are being answered (or wait for their turn).
    InProgress,
    /// Cancel asked: in-flight lines are being stopped.
    Cancelling,
    /// Every line answered.
    Completed,
    /// Stopped by a cancel; lines answered before it keep their answers.
    Cancelled,
    /// Stopped because it cannot go on (its tenant left the policy); `error` says why.
    Failed,
}

impl Status {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Cancelling => "cancelling",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Cancelled | Status::Failed)
    }
}

/// What is written once when a job is accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMeta {
    pub id: String,
    pub tenant: String,
    pub created_at: u64,
    /// Requests: the file's non-blank lines.
    pub lines: u32,
    pub input_bytes: u64,
    pub input_sha256: String,
    /// Who submitted it: a uid, or the TCP token's rule.
    pub submitted_by: String,
}

/// A job as the API shows it (OpenAI's batch object, plus the tenant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub object: String,
    pub tenant: String,
    pub status: Status,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub input_bytes: u64,
    pub input_sha256: String,
    pub output_bytes: u64,
    pub error_bytes: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestCounts {
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
}

/// One journal record.
#[derive(Debug, Clone, PartialEq)]
enum Record {
    /// A line's answer: its output line (JSON, no newline), for `output.jsonl` or, failed, for
    /// `errors.jsonl`.
    Answered {
        line: u32,
        failed: bool,
        output: Vec<u8>,
    },
    Event(Event),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Started {
        at: u64,
    },
    Cancelling {
        at: u64,
    },
    Finished {
        status: Status,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

const ANSWERED_OK: u8 = 1;
const ANSWERED_FAILED: u8 = 2;
const EVENT: u8 = 3;

impl Record {
    fn encode(&self) -> Vec<u8> {
        match self {
            Record::Answered {
                line,
                failed,
                output,
            } => {
                let mut out = Vec::with_capacity(5 + output.len());
                out.push(if *failed {
                    ANSWERED_FAILED
                } else {
                    ANSWERED_OK
                });
                out.extend_from_slice(&line.to_le_bytes());
                out.extend_from_slice(output);
                out
            }
            Record::Event(event) => {
                let mut out = vec![EVENT];
                // An enum of plain fields always encodes.
                out.extend(serde_json::to_vec(event).unwrap_or_default());
                out
            }
        }
    }

    fn decode(payload: &[u8]) -> Option<Record> {
        let (&kind, rest) = payload.split_first()?;
        match kind {
            ANSWERED_OK | ANSWERED_FAILED => {
                let line = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
                Some(Record::Answered {
                    line,
                    failed: kind == ANSWERED_FAILED,
                    output: rest[4..].to_vec(),
                })
            }
            EVENT => serde_json::from_slice(rest).ok().map(Record::Event),
            _ => None,
        }
    }
}

/// What a job has come to, replayed from its journal.
#[derive(Debug)]
struct Progress {
    answered: Vec<bool>,
    counts: RequestCounts,
    status: Status,
    in_progress_at: Option<u64>,
    cancelling_at: Option<u64>,
    finished_at: Option<u64>,
    error: Option<String>,
    /// Bytes the output files hold when they agree with the journal.
    output_bytes: u64,
    error_bytes: u64,
    /// Bytes of whole lines the output files hold now: what is served. Behind the two above
    /// only when an output write failed (the files are rebuilt at the next start).
    output_file_bytes: u64,
    error_file_bytes: u64,
    /// The output files could not be rebuilt at start; they are not served.
    degraded: bool,
}

impl Progress {
    fn new(lines: u32) -> Self {
        Self {
            answered: vec![false; lines as usize],
            counts: RequestCounts {
                total: lines,
                ..RequestCounts::default()
            },
            status: Status::InProgress,
            in_progress_at: None,
            cancelling_at: None,
            finished_at: None,
            error: None,
            output_bytes: 0,
            error_bytes: 0,
            output_file_bytes: 0,
            error_file_bytes: 0,
            degraded: false,
        }
    }

    /// Applies a record; false if it adds nothing (a line answered twice, out of range).
    fn apply(&mut self, record: &Record) -> bool {
        match record {
            Record::Answered {
                line,
                failed,
                output,
            } => {
                match self.answered.get_mut(*line as usize) {
                    Some(seen) if !*seen => *seen = true,
                    _ => return false,
                }
                let bytes = output.len() as u64 + 1;
                if *failed {
                    self.counts.failed += 1;
                    self.error_bytes += bytes;
                } else {
                    self.counts.completed += 1;
                    self.output_bytes += bytes;
                }
            }
            Record::Event(Event::Started { at }) => {
                self.in_progress_at.get_or_insert(*at);
            }
            Record::Event(Event::Cancelling { at }) => {
                if !self.status.is_finished() {
                    self.status = Status::Cancelling;
                    self.cancelling_at.get_or_insert(*at);
                }
            }
            Record::Event(Event::Finished { status, at, error }) => {
                if self.status.is_finished() {
                    return false;
                }
                self.status = *status;
                self.finished_at = Some(*at);
                self.error.clone_from(error);
            }
        }
        true
    }
}

/// A job's writing half: its journal and output files, under one lock so records and their
/// output lines are written in the same order. Held across `fdatasync`; readers use the
/// progress lock instead, which is never held across I/O.
#[derive(Debug)]
struct Writer {
    journal: Journal,
    output: File,
    errors: File,
}

/// One job.
#[derive(Debug)]
pub struct Job {
    pub meta: JobMeta,
    dir: PathBuf,
    /// Where each request line lies in `input.jsonl`: offset and length.
    lines: Vec<(u64, u64)>,
    /// `input.jsonl`, open for the job's life.
    input: File,
    writer: Mutex<Writer>,
    progress: Mutex<Progress>,
    /// Set to true to cancel; the runner watches it.
    cancel: tokio::sync::watch::Sender<bool>,
}

/// Why a job was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the file holds no request; send one JSON request per line")]
    Empty,
    #[error("the file holds more than {limit} requests, the most a job may hold (jobs.max_lines in the daemon config); split it into several jobs")]
    TooManyLines { limit: usize },
    #[error("custom_id {id:?} is on lines {first} and {second}; each line needs its own custom_id to match its answer")]
    DuplicateId {
        id: String,
        first: usize,
        second: usize,
    },
    #[error("tenant {tenant:?} already has {active} unfinished jobs, its limit ({source_of_limit}); wait for one to finish or cancel one")]
    TooMany {
        tenant: String,
        active: usize,
        source_of_limit: &'static str,
    },
    #[error("tenant {tenant:?} has {stored} jobs stored, its limit (jobs.max_stored_per_tenant in the daemon config); finished jobs are deleted after jobs.retention")]
    TooManyStored { tenant: String, stored: usize },
    #[error("batch jobs are not enabled in this daemon")]
    Disabled,
    #[error("cannot store the job: {0}")]
    Io(#[from] io::Error),
}

/// Every job the daemon holds.
#[derive(Debug)]
pub struct Jobs {
    /// `state_dir/jobs`; `None` when jobs are off (an embedded daemon without state).
    root: Option<PathBuf>,
    pub config: JobsConfig,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Held while a job is checked against its tenant's limits and written, so two cannot
    /// both take the last place; the map's lock is never held across that I/O.
    submitting: Mutex<()>,
    uploads: Arc<tokio::sync::Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn new_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Finds the byte ranges of non-blank lines, fed in pieces; stops counting past a limit, so
/// a file of a million tiny lines costs nothing before it is refused.
#[derive(Debug)]
struct LineIndex {
    lines: Vec<(u64, u64)>,
    limit: usize,
    /// Where the current line began, and whether it has a non-blank byte yet.
    start: u64,
    content: bool,
    offset: u64,
    /// More than `limit` lines were seen.
    over: bool,
}

impl LineIndex {
    fn new(limit: usize) -> Self {
        Self {
            lines: Vec::new(),
            limit,
            start: 0,
            content: false,
            offset: 0,
            over: false,
        }
    }

    fn end_line(&mut self, end: u64) {
        if self.content {
            if self.lines.len() >= self.limit {
                self.over = true;
            } else {
                self.lines.push((self.start, end - self.start));
            }
        }
        self.start = end + 1;
        self.content = false;
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.over {
                return;
            }
            if b == b'\n' {
                self.end_line(self.offset);
            } else if !b.is_ascii_whitespace() {
                self.content = true;
            }
            self.offset += 1;
        }
    }

    /// The lines, or `Err(())` when there were more than the limit.
    fn finish(mut self) -> Result<Vec<(u64, u64)>, ()> {
        if !self.over {
            self.end_line(self.offset);
        }
        if self.over {
            Err(())
        } else {
            Ok(self.lines)
        }
    }
}

/// The byte ranges of the non-blank lines in `bytes`, or `Err(())` past `limit` lines.
fn index_lines(bytes: &[u8], limit: usize) -> Result<Vec<(u64, u64)>, ()> {
    let mut index = LineIndex::new(limit);
    index.feed(bytes);
    index.finish()
}

/// A fresh job id: 96 random bits, so ids reveal nothing of other jobs.
fn new_id() -> String {
    use rand::TryRngCore as _;
    let mut bytes = [0u8; 12];
    if rand::rngs::OsRng.try_fill_bytes(&mut bytes).is_err() {
        // The kernel's generator does not fail once booted; fall back to time and pid.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(now as u64).to_le_bytes());
        bytes[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}

/// Whether `id` has the shape of a job id (checked before it names a path).
pub fn is_job_id(id: &str) -> bool {
    id.len() == 28
        && id.starts_with("job_")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Job {
    /// The request on line `i` (0-based among non-blank lines), read from `input.jsonl`;
    /// `Ok(Err(len))` when it is longer than `limit` bytes (nothing is read).
    pub fn read_line(&self, i: u32, limit: u64) -> io::Result<Result<Vec<u8>, u64>> {
        use std::os::unix::fs::FileExt as _;
        let (offset, len) =
            self.lines.get(i as usize).copied().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no line {i}"))
            })?;
        if len > limit {
            return Ok(Err(len));
        }
        let mut buf = vec![0u8; len as usize];
        self.input.read_exact_at(&mut buf, offset)?;
        Ok(Ok(buf))
    }

    /// Lines with no answer yet, in file order.
    pub fn pending(&self) -> Vec<u32> {
        let progress = lock(&self.progress);
        (0..self.meta.lines)
            .filter(|&i| !progress.answered[i as usize])
            .collect()
    }

    pub fn status(&self) -> Status {
        lock(&self.progress).status
    }

    pub fn view(&self) -> JobView {
        let p = lock(&self.progress);
        let finished = |s: Status| (p.status == s).then_some(p.finished_at).flatten();
        JobView {
            id: self.meta.id.clone(),
            object: "batch".into(),
            tenant: self.meta.tenant.clone(),
            status: p.status,
            created_at: self.meta.created_at,
            in_progress_at: p.in_progress_at,
            cancelling_at: p.cancelling_at,
            completed_at: finished(Status::Completed),
            cancelled_at: finished(Status::Cancelled),
            failed_at: finished(Status::Failed),
            request_counts: p.counts,
            input_bytes: self.meta.input_bytes,
            input_sha256: self.meta.input_sha256.clone(),
            output_bytes: p.output_file_bytes,
            error_bytes: p.error_file_bytes,
            error: p.error.clone(),
        }
    }

    /// Journals `record` and applies it; an answer then goes to its output file. Returns false
    /// if it changed nothing (the line was already answered, the job already finished).
    fn record(&self, record: Record) -> io::Result<bool> {
        let mut writer = lock(&self.writer);
        // Checked before anything is written, so a record that adds nothing is never
        // journaled; only this lock's holder changes the progress, so the answer holds.
        let (adds, file_bytes) = {
            let p = lock(&self.progress);
            let adds = match &record {
                Record::Answered { line, .. } => {
                    p.answered.get(*line as usize).is_some_and(|seen| !seen)
                }
                Record::Event(Event::Finished { .. }) => !p.status.is_finished(),
                Record::Event(Event::Cancelling { .. }) => {
                    !p.status.is_finished() && p.status != Status::Cancelling
                }
                Record::Event(Event::Started { .. }) => p.in_progress_at.is_none(),
            };
            (adds, (p.output_file_bytes, p.error_file_bytes))
        };
        if !adds {
            return Ok(false);
        }
        writer.journal.append(&record.encode())?;
        let mut written = (0u64, 0u64);
        if let Record::Answered { failed, output, .. } = &record {
            let (file, before) = if *failed {
                (&mut writer.errors, file_bytes.1)
            } else {
                (&mut writer.output, file_bytes.0)
            };
            let mut line = Vec::with_capacity(output.len() + 1);
            line.extend_from_slice(output);
            line.push(b'\n');
            match file.write_all(&line) {
                Ok(()) if *failed => written.1 = line.len() as u64,
                Ok(()) => written.0 = line.len() as u64,
                Err(e) => {
                    // The journal holds the answer; the file drops the cut line and is rebuilt
                    // from the journal at the next start.
                    let _ = file.set_len(before);
                    tracing::warn!(job = %self.meta.id, error = %e, "an answer is journaled but its output file could not be written; it is rebuilt at the next start");
                }
            }
        }
        let mut p = lock(&self.progress);
        p.apply(&record);
        p.output_file_bytes += written.0;
        p.error_file_bytes += written.1;
        Ok(true)
    }

    /// Records line `line`'s answer (journaled before this returns).
    pub fn answer(&self, line: u32, failed: bool, output: Vec<u8>) -> io::Result<bool> {
        self.record(Record::Answered {
            line,
            failed,
            output,
        })
    }

    pub fn mark_started(&self) -> io::Result<()> {
        self.record(Record::Event(Event::Started { at: unix_now() }))
            .map(drop)
    }

    pub fn finish(&self, status: Status, error: Option<String>) -> io::Result<bool> {
        self.record(Record::Event(Event::Finished {
            status,
            at: unix_now(),
            error,
        }))
    }

    /// Asks the runner to stop; false if the job had already finished. The runner is told
    /// even if the journal cannot say so (a restart then runs the job on).
    pub fn request_cancel(&self) -> io::Result<bool> {
        if self.status().is_finished() {
            return Ok(false);
        }
        let journaled = self.record(Record::Event(Event::Cancelling { at: unix_now() }));
        self.cancel.send_replace(true);
        journaled.map(|_| true)
    }

    /// The runner's view of cancellation.
    pub fn cancelled(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// The output (or, with `errors`, the error) file and how many bytes of it are whole
    /// lines now.
    pub fn output_file(&self, errors: bool) -> io::Result<(File, u64)> {
        let p = lock(&self.progress);
        if p.degraded {
            return Err(io::Error::other(
                "the job's output files could not be rebuilt from its journal at start (see the daemon log); they are served again after a restart with free space",
            ));
        }
        let len = if errors {
            p.error_file_bytes
        } else {
            p.output_file_bytes
        };
        let name = if errors {
            "errors.jsonl"
        } else {
            "output.jsonl"
        };
        Ok((File::open(self.dir.join(name))?, len))
    }

    fn finished_at(&self) -> Option<u64> {
        let p = lock(&self.progress);
        p.status.is_finished().then_some(p.finished_at).flatten()
    }
}

impl Jobs {
    /// Jobs off: every job request is answered 503.
    pub fn disabled(config: JobsConfig) -> Self {
        Self {
            root: None,
            config,
            jobs: Mutex::new(HashMap::new()),
            submitting: Mutex::new(()),
            uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS_AT_ONCE)),
        }
    }

    /// Opens `root`, creating it, and loads every job in it: half-written submissions are
    /// removed, torn journal tails repaired, output files rebuilt where they disagree with
    /// their journal, and finished jobs past their retention deleted.
    pub fn open(root: &Path, config: JobsConfig) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        let jobs = Self {
            root: Some(root.to_owned()),
            config,
            jobs: Mutex::new(HashMap::new()),
            submitting: Mutex::new(()),
            uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS_AT_ONCE)),
        };
        let mut loaded = HashMap::new();
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-") {
                // A submission that never got its 201.
                tracing::info!(path = %path.display(), "removing a job submission cut short");
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove it");
                }
                continue;
            }
            if !is_job_id(&name) || !entry.file_type()?.is_dir() {
                continue;
            }
            match load_job(&path, &name) {
                Ok(job) => {
                    loaded.insert(name, Arc::new(job));
                }
                Err(e) => {
                    tracing::error!(job = %name, error = %e, "cannot load a job; it is left on disk and not served")
                }
            }
        }
        tracing::info!(
            jobs = loaded.len(),
            unfinished = loaded.values().filter(|j| !j.status().is_finished()).count(),
            dir = %root.display(),
            "batch jobs loaded"
        );
        *lock(&jobs.jobs) = loaded;
        jobs.expire();
        Ok(jobs)
    }

    /// Deletes finished jobs older than the retention.
    pub fn expire(&self) {
        let horizon = unix_now().saturating_sub(self.config.retention.as_secs());
        let expired: Vec<Arc<Job>> = {
            let mut jobs = lock(&self.jobs);
            let ids: Vec<String> = jobs
                .values()
                .filter(|j| j.finished_at().is_some_and(|at| at < horizon))
                .map(|j| j.meta.id.clone())
                .collect();
            ids.iter().filter_map(|id| jobs.remove(id)).collect()
        };
        for job in expired {
            tracing::info!(job = %job.meta.id, tenant = %job.meta.tenant, "deleting a finished job past its retention");
            if let Err(e) = std::fs::remove_dir_all(&job.dir) {
                tracing::warn!(job = %job.meta.id, error = %e, "cannot delete the job's files");
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.root.is_some()
    }

    /// A permit to read one upload's body, or `None` when enough are being read already.
    pub fn upload_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.uploads.clone().try_acquire_owned().ok()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(id).cloned()
    }

    /// Every job, newest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        let mut all: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        all.sort_by(|a, b| (b.meta.created_at, &b.meta.id).cmp(&(a.meta.created_at, &a.meta.id)));
        all
    }

    /// Checks and stores a job; it is durable when this returns. Blocking (writes and
    /// fsyncs): call it off the async threads.
    pub fn submit(
        &self,
        tenant: &str,
        submitted_by: &str,
        max_active: Option<u32>,
        body: &[u8],
    ) -> Result<Arc<Job>, SubmitError> {
        let root = self.root.as_ref().ok_or(SubmitError::Disabled)?;
        let lines =
            index_lines(body, self.config.max_lines).map_err(|()| SubmitError::TooManyLines {
                limit: self.config.max_lines,
            })?;
        if lines.is_empty() {
            return Err(SubmitError::Empty);
        }
        check_custom_ids(body, &lines)?;
        let (limit, source_of_limit) = match max_active {
            Some(l) => (l, "limits.max_jobs in the policy"),
            None => (
                self.config.max_active_per_tenant,
                "jobs.max_active_per_tenant in the daemon config",
            ),
        };
        let _submitting = lock(&self.submitting);
        let (active, stored) = {
            let jobs = lock(&self.jobs);
            let mine: Vec<&Arc<Job>> = jobs.values().filter(|j| j.meta.tenant == tenant).collect();
            let active = mine.iter().filter(|j| !j.status().is_finished()).count();
            (active, mine.len())
        };
        if active >= limit as usize {
            return Err(SubmitError::TooMany {
                tenant: tenant.to_owned(),
                active,
                source_of_limit,
            });
        }
        if stored >= self.config.max_stored_per_tenant as usize {
            return Err(SubmitError::TooManyStored {
                tenant: tenant.to_owned(),
                stored,
            });
        }
        let id = new_id();
        let meta = JobMeta {
            id: id.clone(),
            tenant: tenant.to_owned(),
            created_at: unix_now(),
            lines: lines.len() as u32,
            input_bytes: body.len() as u64,
            input_sha256: format!("{:x}", sha2::Sha256::digest(body)),
            submitted_by: submitted_by.to_owned(),
        };
        let tmp = root.join(format!(".tmp-{id}"));
        let dir = root.join(&id);
        // Everything is written and opened under the temporary name, so once the rename
        // makes the job durable nothing can fail and leave it stored but refused.
        let opened = write_job(&tmp, &meta, body).and_then(|()| {
            let (journal, _) = Journal::open(&tmp.join("journal"), |_| {})?;
            let writer = Writer {
                journal,
                output: open_append(&tmp.join("output.jsonl"))?,
                errors: open_append(&tmp.join("errors.jsonl"))?,
            };
            let input = File::open(tmp.join("input.jsonl"))?;
            std::fs::rename(&tmp, &dir)?;
            Ok((writer, input))
        });
        let (writer, input) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.into());
            }
        };
        if let Err(e) = fsync_dir(root) {
            // The job is in place; only its directory entry's durability is in doubt.
            tracing::warn!(job = %id, error = %e, "cannot sync the jobs directory");
        }
        let progress = Progress::new(meta.lines);
        let job = Arc::new(Job {
            meta,
            lines,
            input,
            writer: Mutex::new(writer),
            progress: Mutex::new(progress),
            dir,
            cancel: tokio::sync::watch::channel(false).0,
        });
        lock(&self.jobs).insert(id, job.clone());
        Ok(job)
    }
}

/// Refuses a file whose requests share a `custom_id` (lines that are not JSON are left for
/// the runner to fail one by one).
fn check_custom_ids(body: &[u8], lines: &[(u64, u64)]) -> Result<(), SubmitError> {
    #[derive(Deserialize)]
    struct IdOnly {
        custom_id: serde_json::Value,
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(lines.len());
    for (i, &(offset, len)) in lines.iter().enumerate() {
        let text = &body[offset as usize..(offset + len) as usize];
        let Ok(IdOnly {
            custom_id: serde_json::Value::String(id),
        }) = serde_json::from_slice::<IdOnly>(text)
        else {
            continue;
        };
        if id.len() > MAX_CUSTOM_ID_BYTES {
            continue;
        }
        if let Some(first) = seen.insert(id.clone(), i + 1) {
            return Err(SubmitError::DuplicateId {
                id,
                first,
                second: i + 1,
            });
        }
    }
    Ok(())
}

/// Writes a job's files into `tmp` and syncs them and it.
fn write_job(tmp: &Path, meta: &JobMeta, body: &[u8]) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(tmp)?;
    let mut input = new_file(&tmp.join("input.jsonl"))?;
    input.write_all(body)?;
    input.sync_all()?;
    let mut meta_file = new_file(&tmp.join("job.json"))?;
    meta_file.write_all(&serde_json::to_vec_pretty(meta).map_err(io::Error::other)?)?;
    meta_file.sync_all()?;
    Journal::create(&tmp.join("journal"))?;
    for name in ["output.jsonl", "errors.jsonl"] {
        new_file(&tmp.join(name))?.sync_all()?;
    }
    fsync_dir(tmp)
}

/// Loads one job's directory: replays its journal (repairing a torn tail) and rebuilds its
/// output files if they disagree with it.
fn load_job(dir: &Path, id: &str) -> io::Result<Job> {
    let mut meta_text = String::new();
    File::open(dir.join("job.json"))?
        .take(MAX_META_BYTES)
        .read_to_string(&mut meta_text)?;
    let meta: JobMeta = serde_json::from_str(&meta_text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("job.json: {e}")))?;
    if meta.id != id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("job.json names job {:?}", meta.id),
        ));
    }
    let journal_path = dir.join("journal");
    let mut progress = Progress::new(meta.lines);
    let mut unreadable = 0usize;
    let (journal, repair) =
        Journal::open(&journal_path, |payload| match Record::decode(payload) {
            Some(record) => {
                progress.apply(&record);
            }
            None => unreadable += 1,
        })?;
    if let Some(r) = &repair {
        tracing::warn!(job = %id, valid_bytes = r.valid_bytes, dropped_bytes = r.dropped_bytes, reason = r.reason, "repaired the job journal's torn tail; the lines it held are answered again");
    }
    if unreadable > 0 {
        tracing::warn!(job = %id, records = unreadable, "journal records of an unknown kind were skipped");
    }
    let output_path = dir.join("output.jsonl");
    let errors_path = dir.join("errors.jsonl");
    let size = |p: &Path| std::fs::metadata(p).map_or(u64::MAX, |m| m.len());
    if size(&output_path) != progress.output_bytes || size(&errors_path) != progress.error_bytes {
        tracing::info!(job = %id, "rebuilding the job's output files from its journal");
        if let Err(e) = rebuild_outputs(&journal_path, &output_path, &errors_path, meta.lines) {
            // The journal is whole, so the job runs on; only its outputs wait for a restart.
            tracing::error!(job = %id, error = %e, "cannot rebuild the job's output files; they are not served until a restart rebuilds them");
            progress.degraded = true;
        }
    }
    let input = File::open(dir.join("input.jsonl"))?;
    // Only a job with lines still to answer needs to find them: a finished one's input is
    // not read at start.
    let lines = if progress.status.is_finished() {
        Vec::new()
    } else {
        index_input(&input, meta.lines)?
    };
    progress.output_file_bytes = progress.output_bytes;
    progress.error_file_bytes = progress.error_bytes;
    Ok(Job {
        meta,
        dir: dir.to_owned(),
        lines,
        input,
        writer: Mutex::new(Writer {
            journal,
            output: open_append(&output_path)?,
            errors: open_append(&errors_path)?,
        }),
        progress: Mutex::new(progress),
        cancel: tokio::sync::watch::channel(false).0,
    })
}

/// The byte ranges of a stored input's `expected` request lines, read in pieces.
fn index_input(input: &File, expected: u32) -> io::Result<Vec<(u64, u64)>> {
    let mut index = LineIndex::new(expected as usize);
    let mut reader = io::BufReader::with_capacity(1 << 16, input);
    loop {
        let buf = io::BufRead::fill_buf(&mut reader)?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        index.feed(buf);
        io::BufRead::consume(&mut reader, n);
    }
    index
        .finish()
        .ok()
        .filter(|l| l.len() == expected as usize)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("input.jsonl does not hold the {expected} lines job.json says"),
            )
        })
}

/// Rewrites `output.jsonl` and `errors.jsonl` from the journal's answers, in its order.
fn rebuild_outputs(journal: &Path, output: &Path, errors: &Path, lines: u32) -> io::Result<()> {
    let write_tmp = |p: &Path| -> io::Result<(File, PathBuf)> {
        let tmp = p.with_extension("jsonl.rebuild");
        let _ = std::fs::remove_file(&tmp);
        Ok((new_file(&tmp)?, tmp))
    };
    let (out, out_tmp) = write_tmp(output)?;
    let (err, err_tmp) = write_tmp(errors)?;
    let mut out = io::BufWriter::new(out);
    let mut err = io::BufWriter::new(err);
    let mut progress = Progress::new(lines);
    let mut failure: Option<io::Error> = None;
    Journal::open(journal, |payload| {
        let Some(record) = Record::decode(payload) else {
            return;
        };
        if !progress.apply(&record) || failure.is_some() {
            return;
        }
        if let Record::Answered { failed, output, .. } = record {
            let file = if failed { &mut err } else { &mut out };
            if let Err(e) = file.write_all(&output).and_then(|()| file.write_all(b"\n")) {
                failure = Some(e);
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    for (writer, tmp, path) in [(out, out_tmp, output), (err, err_tmp, errors)] {
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(tmp, path)?;
    }
    if let Some(dir) = output.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// How long the retention sweep waits between runs.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests;
