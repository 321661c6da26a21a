//! The desired state on flash: `<state_dir>/desired.skf`, with the generation
//! before it kept as `desired.prev.skf`; and the rollout's files: the last
//! good generation `good.skf` (a hard link to a former `desired.skf` when it
//! can be, so a commit writes no state bytes) and the record `rollout.skf`
//! (see `crate::rollout`).
//!
//! Invariants: the file is replaced atomically (see `fsutil`), so after a
//! power cut at any instant it decodes to the old or the new state; the
//! previous generation is hard-linked aside before the replace, so there is
//! always a `desired.skf`; a write happens only when the state changed; an
//! exclusive lock (`desired.lock`) serialises writers (`skiff apply`, the
//! agent). A file that fails its CRC is never trusted: `load` falls back to the
//! previous generation and says so.
//!
//! `save` writes only a state that decodes back within the size limit the
//! agent reads with; keeps as `desired.prev.skf` only a current file that is
//! readable, and only once the new bytes are safely on flash; and numbers a
//! local state above every generation it can see, never reusing one and
//! never wrapping.

use crate::fsutil::sync_dir;
use crate::rollout::Record;
use nix::fcntl::{Flock, FlockArg};
use skiff_common::codec::{state_file, CodecError, Kind};
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
    /// The state would not load back (over the size limit, say): not written.
    #[error("the desired state cannot be stored: {0}")]
    Unstorable(CodecError),
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

/// Schema of `rollout.skf` written by this build.
pub const RECORD_SCHEMA: u8 = 1;
/// Far above any real record.
const RECORD_LIMIT: usize = 4096;

/// The rollout's files as `load_rollout` found them.
#[derive(Debug, Default)]
pub struct RolloutFiles {
    /// `None` when there is none yet (a new board, or an upgrade).
    pub record: Option<Record>,
    /// The last good state, when it is on flash and readable.
    pub good: Option<DesiredState>,
    /// What was unreadable and ignored (for the log).
    pub problems: Vec<String>,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> StateStore {
        StateStore { dir: state_dir.to_path_buf() }
    }

    fn good_path(&self) -> PathBuf {
        self.dir.join("good.skf")
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("rollout.skf")
    }

    /// The rollout record and the last good state. An unreadable record is
    /// reported and treated as none (the stored generation is then trusted);
    /// an unreadable good state as none (there is nothing to go back to).
    pub fn load_rollout(&self) -> RolloutFiles {
        let mut files = RolloutFiles::default();
        match std::fs::read(self.record_path()) {
            Ok(bytes) => match decode_record(&bytes) {
                Ok(r) => files.record = Some(r),
                Err(e) => files.problems.push(format!("{}: {e}", self.record_path().display())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => files.problems.push(format!("{}: {e}", self.record_path().display())),
        }
        match Self::read(&self.good_path()) {
            Ok(good) => files.good = good,
            Err(e) => files.problems.push(e.to_string()),
        }
        files
    }

    /// Writes the rollout record (atomically).
    pub fn save_record(&self, record: &Record) -> Result<(), StoreError> {
        let bytes = encode_record(record)?;
        crate::fsutil::atomic_write(&self.record_path(), &bytes).map_err(self.io(self.record_path()))
    }

    /// Keeps `state` as the last good one, then writes `record`. When
    /// `desired.skf` holds exactly `state` (the usual case), `good.skf`
    /// becomes a hard link to it: no state bytes are written.
    pub fn commit(&self, state: &DesiredState, record: &Record) -> Result<(), StoreError> {
        let _guard = self.lock()?;
        let good = self.good_path();
        let tmp = self.dir.join(".good.skf.tmp");
        let _ = std::fs::remove_file(&tmp);
        let same = Self::read(&self.path()).ok().flatten().is_some_and(|cur| &cur == state);
        if same && std::fs::hard_link(self.path(), &tmp).is_ok() {
            std::fs::rename(&tmp, &good).map_err(self.io(good.clone()))?;
            sync_dir(&self.dir).map_err(self.io(self.dir.clone()))?;
        } else {
            let _ = std::fs::remove_file(&tmp);
            let bytes = state_file::encode(state).map_err(StoreError::Unstorable)?;
            crate::fsutil::atomic_write(&good, &bytes).map_err(self.io(good.clone()))?;
        }
        self.save_record(record)
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

    /// Stores `next` as the next generation, unless it equals what is
    /// stored. `generation`: the caller's number (from the controller), or
    /// `None` for one above every generation stored (see [`Self::save_above`]).
    pub fn save(&self, next: DesiredState, generation: Option<u64>) -> Result<Saved, StoreError> {
        self.save_inner(next, generation, 0)
    }

    /// Stores `next` with a generation of its own: one above `floor` (what a
    /// running agent reports it runs) and above every generation either file
    /// holds, so no generation is ever handed out twice.
    pub fn save_above(&self, next: DesiredState, floor: u64) -> Result<Saved, StoreError> {
        self.save_inner(next, None, floor)
    }

    fn save_inner(
        &self,
        mut next: DesiredState,
        generation: Option<u64>,
        floor: u64,
    ) -> Result<Saved, StoreError> {
        let _guard = self.lock()?;
        // Read both files directly: an unreadable one must neither be
        // compared against nor be kept as the previous generation.
        let current = Self::read(&self.path()).ok().flatten();
        let prev = Self::read(&self.prev()).ok().flatten();
        // A stored generation that failed its rollout is not "unchanged": the
        // same content applied again is a new try, under a new generation.
        let failed = self.load_rollout().record.and_then(|r| r.failed).map(|f| f.generation);
        if let Some(cur) = &current {
            if cur.apps == next.apps
                && cur.rollout == next.rollout
                && cur.origin == next.origin
                && generation.is_none_or(|g| g == cur.generation)
                && (generation.is_some() || failed != Some(cur.generation))
            {
                return Ok(Saved::Unchanged(cur.generation));
            }
        }
        next.generation = match generation {
            Some(g) => g,
            None => {
                let highest = [current.as_ref(), prev.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|s| s.generation)
                    .chain(damaged_generation(&self.path()))
                    .fold(floor, u64::max);
                // Checked: a generation at the bound must not wrap to 0.
                highest
                    .checked_add(1)
                    .filter(|g| *g <= MAX_GENERATION)
                    .ok_or(StoreError::GenerationsExhausted { path: self.path(), generation: highest })?
            }
        };
        let bytes = state_file::encode(&next).map_err(StoreError::Unstorable)?;
        // What the agent could not load is never written: the same decode
        // (and its size limit) that reads the file back must accept it.
        state_file::decode(&bytes).map_err(StoreError::Unstorable)?;
        // The new bytes are on flash (temp file, fsynced) before anything else
        // changes: a full disk fails here, with both files untouched.
        let tmp = self.dir.join(".desired.skf.tmp");
        write_synced(&tmp, &bytes).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::Io { path: tmp.clone(), source: e }
        })?;
        if current.is_some() {
            // Keep the readable generation being replaced. Link, then rename
            // over the old copy, so `prev` is always either complete or the
            // older one. An unreadable current file is not kept: `prev` stays
            // the last good state.
            let prev_tmp = self.dir.join(".desired.prev.tmp");
            let _ = std::fs::remove_file(&prev_tmp);
            std::fs::hard_link(self.path(), &prev_tmp).map_err(self.io(prev_tmp.clone()))?;
            std::fs::rename(&prev_tmp, self.prev()).map_err(self.io(self.prev()))?;
        }
        std::fs::rename(&tmp, self.path()).map_err(self.io(self.path()))?;
        sync_dir(&self.dir).map_err(self.io(self.dir.clone()))?;
        Ok(Saved::Written(next.generation))
    }
}

fn encode_record(r: &Record) -> Result<Vec<u8>, StoreError> {
    r.validate().map_err(|e| StoreError::Unstorable(CodecError::Encode(e)))?;
    skiff_common::codec::encode(Kind::RolloutRecord, RECORD_SCHEMA, r).map_err(StoreError::Unstorable)
}

/// Reads `rollout.skf` and checks what it claims.
pub fn decode_record(bytes: &[u8]) -> Result<Record, CodecError> {
    let r: Record = skiff_common::codec::decode(bytes, Kind::RolloutRecord, RECORD_SCHEMA, RECORD_LIMIT)?;
    r.validate().map_err(CodecError::Payload)?;
    Ok(r)
}

/// The generation a damaged state file was written with, when its envelope
/// header is intact (magic, kind, full length) and only the payload fails:
/// the generation is the payload's first field (a postcard varint). A state
/// that lost its CRC must not have its number handed out again.
fn damaged_generation(path: &Path) -> Option<u64> {
    use skiff_common::codec::{Kind, HEADER_LEN, MAGIC};
    let bytes = std::fs::read(path).ok()?;
    if state_file::decode(&bytes).is_ok() || bytes.len() < HEADER_LEN {
        return None;
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().ok()?) as usize;
    if bytes[0..4] != MAGIC || bytes[4] != Kind::StateFile as u8 || bytes.len() - HEADER_LEN != len {
        return None;
    }
    let mut value: u64 = 0;
    for (i, b) in bytes[HEADER_LEN..].iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    // 0600 whatever the umask: env values carry tokens.
    let mut f = crate::fsutil::create_private(path, true)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::toml_file;

    fn state(image: &str) -> DesiredState {
        toml_file::parse(&format!("[[app]]\nname = \"a\"\nimage = \"{image}\"\n")).unwrap()
    }

    #[test]
    fn the_rollout_record_and_the_last_good_state_round_trip_and_a_commit_links() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        let files = s.load_rollout();
        assert!(files.record.is_none() && files.good.is_none() && files.problems.is_empty());
        s.save(state("one"), None).unwrap();
        let one = s.load().unwrap().state;
        let r = Record { committed: 1, testing: None, failed: None };
        s.commit(&one, &r).unwrap();
        let ino = |f: &str| std::fs::metadata(d.path().join(f)).unwrap().ino();
        assert_eq!(ino("good.skf"), ino("desired.skf"), "a commit of what is stored is a hard link");
        let files = s.load_rollout();
        assert_eq!((files.record, files.good), (Some(r.clone()), Some(one.clone())));
        // A state that is not the stored one is written out.
        s.save(state("two"), None).unwrap();
        s.commit(&one, &r).unwrap();
        assert_ne!(ino("good.skf"), ino("desired.skf"));
        assert_eq!(s.load_rollout().good, Some(one));
        // A damaged record is reported and ignored, never trusted.
        let mut bytes = std::fs::read(d.path().join("rollout.skf")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(d.path().join("rollout.skf"), &bytes).unwrap();
        let files = s.load_rollout();
        assert!(files.record.is_none());
        assert!(files.problems[0].contains("rollout.skf"), "{:?}", files.problems);
        // An impossible record is refused on write and on read.
        let bad = Record { committed: 3, testing: Some((3, 0)), failed: None };
        assert!(s.save_record(&bad).is_err());
        let raw = skiff_common::codec::encode(Kind::RolloutRecord, RECORD_SCHEMA, &bad).unwrap();
        assert!(decode_record(&raw).is_err());
    }

    #[test]
    fn the_fuzz_seed_of_the_record_is_a_valid_record() {
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/rollout_record/testing");
        let r = decode_record(&std::fs::read(seed).unwrap()).unwrap();
        assert_eq!(r, Record { committed: 1, testing: Some((2, 1)), failed: None });
    }

    #[test]
    fn a_failed_generation_applied_again_is_a_new_generation() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.save(state("one"), None).unwrap(), Saved::Written(1));
        let failed =
            skiff_common::RolloutFailure { generation: 1, app: None, reason: "x".into(), rolled_back: true };
        s.save_record(&Record { committed: 0, testing: None, failed: Some(failed) }).unwrap();
        assert_eq!(s.save(state("one"), None).unwrap(), Saved::Written(2));
        // A controller's re-send of the same generation stays unchanged.
        let mut again = s.load().unwrap().state;
        again.origin = skiff_common::Origin::Local;
        assert_eq!(s.save(again, Some(2)).unwrap(), Saved::Unchanged(2));
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
        assert!(matches!(s.save(state("two"), Some(MAX_GENERATION + 1)), Err(StoreError::Unstorable(_))));
        assert_eq!(s.load().unwrap().state.generation, MAX_GENERATION);
    }

    #[test]
    fn controller_generation_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.save(state("one"), Some(1000)).unwrap(), Saved::Written(1000));
        assert_eq!(s.save(state("two"), None).unwrap(), Saved::Written(1001));
    }

    fn files(s: &StateStore) -> (Vec<u8>, Option<Vec<u8>>) {
        (std::fs::read(s.path()).unwrap(), std::fs::read(s.prev()).ok())
    }

    #[test]
    fn a_state_over_the_read_limit_is_not_written() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        s.save(state("one"), None).unwrap();
        s.save(state("two"), None).unwrap();
        let before = files(&s);
        let mut big = state("three");
        big.apps[0].env.insert("PAD".into(), "x".repeat(state_file::LIMIT));
        let e = s.save(big, None).unwrap_err();
        assert!(matches!(e, StoreError::Unstorable(CodecError::TooLarge { .. })), "{e}");
        assert_eq!(files(&s), before, "a refused state changed the files");
        assert_eq!(s.load().unwrap().state.generation, 2);
    }

    #[test]
    fn a_failed_write_leaves_both_files_alone() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        s.save(state("one"), None).unwrap();
        s.save(state("two"), None).unwrap();
        let before = files(&s);
        // The temp file cannot be created: a directory sits at its name.
        std::fs::create_dir(d.path().join(".desired.skf.tmp")).unwrap();
        assert!(matches!(s.save(state("three"), None), Err(StoreError::Io { .. })));
        assert_eq!(files(&s), before, "a failed save replaced desired.prev.skf");
        std::fs::remove_dir(d.path().join(".desired.skf.tmp")).unwrap();
        assert_eq!(s.save(state("three"), None).unwrap(), Saved::Written(3));
    }

    #[test]
    fn an_unreadable_current_file_is_not_kept_and_its_generation_not_reused() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        s.save(state("one"), None).unwrap();
        s.save(state("two"), None).unwrap();
        let good_prev = std::fs::read(s.prev()).unwrap();
        std::fs::write(s.path(), b"garbage").unwrap();
        // A running agent reports generation 2 (the file it loaded before
        // the damage): the new state goes above it.
        assert_eq!(s.save_above(state("three"), 2).unwrap(), Saved::Written(3));
        assert_eq!(std::fs::read(s.prev()).unwrap(), good_prev, "the garbage became desired.prev.skf");
        assert_eq!(s.load().unwrap().state.generation, 3);
        // A file that only fails its CRC still tells its generation: a
        // local apply without an agent does not reuse it either.
        let mut bytes = std::fs::read(s.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(s.path(), &bytes).unwrap();
        assert_eq!(s.save(state("five"), None).unwrap(), Saved::Written(4));
        assert_eq!(s.load().unwrap().state.apps[0].image.to_string(), "five");
        // Both files unreadable: still no generation 1 again.
        std::fs::write(s.path(), b"garbage").unwrap();
        std::fs::write(s.prev(), b"garbage").unwrap();
        assert_eq!(s.save_above(state("four"), 4).unwrap(), Saved::Written(5));
    }

    #[test]
    fn generations_never_wrap() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        let max = MAX_GENERATION;
        assert_eq!(s.save(state("one"), Some(max)).unwrap(), Saved::Written(max));
        let before = files(&s);
        let e = s.save(state("two"), None).unwrap_err();
        assert!(matches!(e, StoreError::GenerationsExhausted { generation, .. } if generation == max), "{e}");
        // A generation beyond the bound is refused before anything is written.
        let e = s.save(state("two"), Some(max + 1)).unwrap_err();
        assert!(matches!(e, StoreError::Unstorable(_)), "{e}");
        assert_eq!(files(&s), before);
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert!(matches!(s.save_above(state("one"), u64::MAX), Err(StoreError::GenerationsExhausted { .. })));
    }
}
