//! The desired state on flash: `<state_dir>/desired.skf`, with the generation
//! before it kept as `desired.prev.skf`.
//!
//! Invariants: the file is replaced atomically (see `fsutil`), so after a
//! power cut at any instant it decodes to the old or the new state; the
//! previous generation is hard-linked aside before the replace, so there is
//! always a `desired.skf`; a write happens only when the state changed; an
//! exclusive lock (`desired.lock`) serialises writers (`skiff apply`, the
//! agent). A file that fails its CRC is never trusted: `load` falls back to the
//! previous generation and says so.

use crate::fsutil::{atomic_write, sync_dir};
use nix::fcntl::{Flock, FlockArg};
use skiff_common::codec::{state_file, CodecError};
use skiff_common::validate::MAX_GENERATION;
use skiff_common::DesiredState;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Corrupt { path: PathBuf, source: CodecError },
    #[error(
        "{path}: generation {generation} is the highest allowed, so a local apply cannot follow it; `skiffctl apply --reset` takes the device back, or remove the file to start over"
    )]
    GenerationsExhausted { path: PathBuf, generation: u64 },
}

pub struct StateStore {
    dir: PathBuf,
}

/// What `load` found.
#[derive(Debug)]
pub struct Loaded {
    pub state: DesiredState,
    /// Set when the current file was unreadable and the previous one was used.
    pub fell_back: Option<String>,
}

/// Outcome of `save`.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    Written(u64),
    Unchanged(u64),
}

impl StateStore {
    pub fn new(state_dir: &Path) -> StateStore {
        StateStore { dir: state_dir.to_path_buf() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("desired.skf")
    }

    fn prev(&self) -> PathBuf {
        self.dir.join("desired.prev.skf")
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::Io { path, source }
    }

    fn read(path: &Path) -> Result<Option<DesiredState>, StoreError> {
        match std::fs::read(path) {
            Ok(b) => state_file::decode(&b)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path: path.to_path_buf(), source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path: path.to_path_buf(), source }),
        }
    }

    /// The stored desired state; empty (generation 0) when none was ever stored.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        match Self::read(&self.path()) {
            Ok(Some(state)) => Ok(Loaded { state, fell_back: None }),
            Ok(None) => match Self::read(&self.prev())? {
                Some(state) => {
                    Ok(Loaded { state, fell_back: Some(format!("{} is missing", self.path().display())) })
                }
                None => Ok(Loaded { state: DesiredState::empty(), fell_back: None }),
            },
            Err(e @ StoreError::Corrupt { .. }) => match Self::read(&self.prev())? {
                Some(state) => Ok(Loaded { state, fell_back: Some(e.to_string()) }),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Takes the writers' lock; held until the guard is dropped.
    pub fn lock(&self) -> Result<Flock<File>, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io(self.dir.clone()))?;
        let path = self.dir.join("desired.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.io(path.clone()))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| StoreError::Io { path, source: e.into() })
    }

    /// Stores `apps` (with `origin`) as the next generation, unless it equals
    /// what is stored. `generation`: the caller's number (from the controller),
    /// or `None` for the stored generation + 1.
    pub fn save(&self, mut next: DesiredState, generation: Option<u64>) -> Result<Saved, StoreError> {
        let _guard = self.lock()?;
        let current = self.load().ok().map(|l| l.state);
        if let Some(cur) = &current {
            if cur.apps == next.apps
                && cur.origin == next.origin
                && generation.is_none_or(|g| g == cur.generation)
            {
                return Ok(Saved::Unchanged(cur.generation));
            }
        }
        let stored = current.as_ref().map(|c| c.generation).unwrap_or(0);
        next.generation = match generation {
            Some(g) => g,
            // Checked: a stored generation at the bound must not wrap to 0.
            None => stored
                .checked_add(1)
                .filter(|g| *g <= MAX_GENERATION)
                .ok_or(StoreError::GenerationsExhausted { path: self.path(), generation: stored })?,
        };
        let bytes =
            state_file::encode(&next).map_err(|source| StoreError::Corrupt { path: self.path(), source })?;
        if self.path().exists() {
            // Keep the generation being replaced. Link, then rename over the old
            // copy, so `prev` is always either complete or the older one.
            let tmp = self.dir.join(".desired.prev.tmp");
            let _ = std::fs::remove_file(&tmp);
            std::fs::hard_link(self.path(), &tmp).map_err(self.io(tmp.clone()))?;
            std::fs::rename(&tmp, self.prev()).map_err(self.io(self.prev()))?;
        }
        atomic_write(&self.path(), &bytes).map_err(self.io(self.path()))?;
        sync_dir(&self.dir).map_err(self.io(self.dir.clone()))?;
        Ok(Saved::Written(next.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::toml_file;

    fn state(image: &str) -> DesiredState {
        toml_file::parse(&format!("[[app]]\nname = \"a\"\nimage = \"{image}\"\n")).unwrap()
    }

    #[test]
    fn generations_grow_unchanged_is_not_written_prev_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.load().unwrap().state.generation, 0);
        assert_eq!(s.save(state("one"), None).unwrap(), Saved::Written(1));
        let mtime = std::fs::metadata(s.path()).unwrap().modified().unwrap();
        assert_eq!(s.save(state("one"), None).unwrap(), Saved::Unchanged(1));
        assert_eq!(std::fs::metadata(s.path()).unwrap().modified().unwrap(), mtime);
        assert_eq!(s.save(state("two"), None).unwrap(), Saved::Written(2));
        assert_eq!(s.load().unwrap().state.apps[0].image.to_string(), "two");
        // Corrupt the current file: load falls back to generation 1 and says so.
        let mut bytes = std::fs::read(s.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(s.path(), &bytes).unwrap();
        let l = s.load().unwrap();
        assert_eq!(l.state.generation, 1);
        assert!(l.fell_back.unwrap().contains("CRC"));
    }

    #[test]
    fn a_state_that_breaks_an_invariant_is_treated_as_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.save(state("one"), None).unwrap(), Saved::Written(1));
        assert_eq!(s.save(state("two"), None).unwrap(), Saved::Written(2));
        // Well-formed and CRC-correct, but a stop grace that would overflow
        // `Instant + grace` at the first stop (and crash the agent on every boot).
        let mut bad = state("two");
        bad.generation = 3;
        bad.apps[0].stop_grace = std::time::Duration::MAX;
        let bytes =
            skiff_common::codec::encode(skiff_common::codec::Kind::StateFile, state_file::SCHEMA, &bad)
                .unwrap();
        std::fs::write(s.path(), bytes).unwrap();
        let l = s.load().unwrap();
        assert_eq!((l.state.generation, l.state.apps[0].image.to_string().as_str()), (1, "one"));
        let why = l.fell_back.unwrap();
        assert!(why.ends_with("invalid desired state: app \"a\": stop_grace: must be at most 10m"), "{why}");
    }

    #[test]
    fn a_local_apply_at_the_highest_generation_is_refused_not_wrapped() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.save(state("one"), Some(MAX_GENERATION)).unwrap(), Saved::Written(MAX_GENERATION));
        let before = std::fs::read(s.path()).unwrap();
        let e = s.save(state("two"), None).unwrap_err();
        assert!(matches!(e, StoreError::GenerationsExhausted { generation: MAX_GENERATION, .. }), "{e}");
        assert_eq!(std::fs::read(s.path()).unwrap(), before);
        // Beyond the bound, not even the controller's number is written.
        assert!(matches!(s.save(state("two"), Some(MAX_GENERATION + 1)), Err(StoreError::Corrupt { .. })));
        assert_eq!(s.load().unwrap().state.generation, MAX_GENERATION);
    }

    #[test]
    fn controller_generation_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.save(state("one"), Some(1000)).unwrap(), Saved::Written(1000));
        assert_eq!(s.save(state("two"), None).unwrap(), Saved::Written(1001));
    }
}
