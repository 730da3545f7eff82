//! Every file a model load reads goes through here, so one loader serves both sides of a
//! worker: the supervisor opens by path and records what it opened ([`record`]); a worker,
//! which may not read the model cache at all, reads only the descriptors the supervisor
//! passed it ([`install`]), and anything else is "not found".

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The files a worker was given, by the path the supervisor opened them at.
#[derive(Debug, Default)]
pub struct Passed {
    pub files: HashMap<PathBuf, File>,
    pub dirs: HashSet<PathBuf>,
}

/// What a recorded load opened: files (with the open descriptors, so the very files read
/// here can be passed on, whatever is at their paths later), and the directories it found to
/// be directories.
#[derive(Debug, Default, Clone)]
pub struct Opened {
    pub files: Vec<PathBuf>,
    pub handles: Vec<std::sync::Arc<File>>,
    pub dirs: Vec<PathBuf>,
}

static PASSED: OnceLock<Passed> = OnceLock::new();

thread_local! {
    static RECORDING: RefCell<Option<Opened>> = const { RefCell::new(None) };
}

/// From now on this process reads model files only from `passed` (a worker, once).
pub fn install(passed: Passed) -> Result<(), String> {
    PASSED
        .set(passed)
        .map_err(|_| "model files were already given to this process".to_owned())
}

/// Runs `load` and says which files and directories it opened.
pub fn record<T>(load: impl FnOnce() -> T) -> (T, Opened) {
    RECORDING.with(|r| *r.borrow_mut() = Some(Opened::default()));
    let value = load();
    let opened = RECORDING
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default();
    (value, opened)
}

fn note(path: &Path, file: Option<&File>) {
    RECORDING.with(|r| {
        if let Some(opened) = r.borrow_mut().as_mut() {
            match file {
                None => {
                    if !opened.dirs.iter().any(|p| p == path) {
                        opened.dirs.push(path.to_owned());
                    }
                }
                Some(file) => {
                    if !opened.files.iter().any(|p| p == path) {
                        if let Ok(dup) = file.try_clone() {
                            opened.files.push(path.to_owned());
                            opened.handles.push(std::sync::Arc::new(dup));
                        }
                    }
                }
            }
        }
    });
}

fn not_passed(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} was not passed to this worker", path.display()),
    )
}

/// Opens a model file for reading.
pub fn open(path: &Path) -> io::Result<File> {
    if let Some(passed) = PASSED.get() {
        return passed
            .files
            .get(path)
            .ok_or_else(|| not_passed(path))?
            .try_clone();
    }
    // Not blocking, so a FIFO put where a model file should be cannot hang the loader; then
    // only a regular file is kept (a device node or FIFO is refused, whatever its name).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    note(path, Some(&file));
    Ok(file)
}

/// The largest model file read whole (configs, tokenizers, templates; weights are mapped).
pub const MAX_READ: u64 = 256 << 20;

/// A whole model file's bytes. Read by position, so a descriptor shared with earlier reads
/// starts at the beginning all the same.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let file = open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, more than the {} MiB a model's configuration, tokenizer or template file may have",
                path.display(),
                MAX_READ >> 20
            ),
        ));
    }
    let mut bytes = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Whether `path` is a model file that can be opened (without opening it).
pub fn exists(path: &Path) -> bool {
    match PASSED.get() {
        Some(passed) => passed.files.contains_key(path) || passed.dirs.contains(path),
        None => path.exists(),
    }
}

/// Whether `path` is a directory (a Hugging Face folder).
pub fn is_dir(path: &Path) -> bool {
    match PASSED.get() {
        Some(passed) => passed.dirs.contains(path),
        None => {
            let dir = path.is_dir();
            if dir {
                note(path, None);
            }
            dir
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_load_names_what_it_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(&file, "{}").unwrap();
        let (text, opened) = record(|| {
            assert!(is_dir(dir.path()));
            assert!(exists(&file));
            assert!(!exists(&dir.path().join("missing")));
            read_to_string(&file).unwrap()
        });
        assert_eq!(text, "{}");
        assert_eq!(opened.files, std::slice::from_ref(&file));
        assert_eq!(opened.handles.len(), 1);
        assert_eq!(opened.dirs, [dir.path().to_owned()]);
        // The descriptor is the file that was read, whatever is at its path later.
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, "swapped").unwrap();
        let mut kept = String::new();
        std::io::Read::read_to_string(&mut &*opened.handles[0], &mut kept).unwrap();
        assert_eq!(kept, "{}");
        // Outside a recording, nothing is noted.
        let (_, nothing) = record(|| ());
        assert!(nothing.files.is_empty() && nothing.dirs.is_empty());
    }

    #[test]
    fn only_regular_files_open_and_none_blocks_or_is_read_whole_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO with no writer would block a plain open for ever.
        let fifo = dir.path().join("tokenizer.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = open(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // A sparse file past the cap is refused before anything is allocated for it.
        let huge = dir.path().join("config.json");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_READ + 1)
            .unwrap();
        let err = read(&huge).unwrap_err();
        assert!(err.to_string().contains("more than the 256 MiB"), "{err}");
        assert!(open(&huge).is_ok());
    }
}
