//! Agent versions side by side on the data partition, and the one link that says which runs.
//!
//! ```text
//! ROOT/versions/<v>/…      complete, verified versions; never written once there
//! ROOT/staging/<v>/…       a version being written; removed when the store is opened
//! ROOT/current -> versions/<v>
//! ROOT/previous -> versions/<v>   what a rollback returns to
//! ROOT/retired/<v>         when version v stopped being current (Unix seconds)
//! ROOT/entries/<v>         the program of version v (its build's entry)
//! ROOT/os/<v>              the OS releases version v runs on (its manifest's `os_releases`)
//! ROOT/confirmed           the version that last checked in successfully (the agent writes it)
//! ```
//!
//! A version appears under `versions/` only by the rename of its finished staging directory,
//! and `current` changes only by the rename of a new link over it: after a crash at any
//! point `current` names a complete version, the old one or the new one. The agent's state
//! directory is elsewhere and nothing here writes to it.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use sitecast_manifest::{AgentBuild, AgentFile, ImageDigest, ImageInfo, OsReleases};

/// The file the agent writes its version to after a successful check-in.
const CONFIRMED: &str = "confirmed";

/// How long a version that stopped being current is kept (and can be rolled back to).
pub const KEEP_RETIRED: SignedDuration = SignedDuration::from_hours(7 * 24);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    /// A staged file is not what the manifest says: nothing of this version was installed.
    #[error("agent {version} file {file}: {error}")]
    Mismatch { version: u64, file: String, error: sitecast_manifest::ImageError },
    #[error("agent version {0} is not installed")]
    NotInstalled(u64),
    #[error("no previous agent version to roll back to")]
    NoPrevious,
}

/// Where a test stops the store as a power cut or kill -9 would (see [`AgentStore::crash_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A file of the staged version written and synced.
    FileStaged,
    /// The staged version renamed into `versions/`.
    VersionInstalled,
    /// `previous` now names the version that was current.
    PreviousLinked,
    /// `current` now names the new version.
    Switched,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |error| StoreError::Io { path: path.to_owned(), error }
}

#[derive(Debug)]
pub struct AgentStore {
    root: PathBuf,
    /// Test hook: called after each [`Step`]; a test aborts the process there.
    crash: Option<fn(Step)>,
}

impl AgentStore {
    /// Opens (or creates) the store at `root` and removes what a crash left half-done.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for dir in ["versions", "staging", "retired"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_at(&path))?;
        }
        let staging = root.join("staging");
        for entry in fs::read_dir(&staging).map_err(io_at(&staging))? {
            let path = entry.map_err(io_at(&staging))?.path();
            fs::remove_dir_all(&path).map_err(io_at(&path))?;
        }
        for link in ["current.new", "previous.new"] {
            let path = root.join(link);
            if fs::symlink_metadata(&path).is_ok() {
                fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        Ok(Self { root: root.to_owned(), crash: None })
    }

    /// The store at `root` as it is: nothing is cleaned up, so a version another process is
    /// staging is left alone. For the agent (the launcher opens the store, and cleans it, only
    /// when it starts, when no agent runs).
    pub fn at(root: &Path) -> Self {
        Self { root: root.to_owned(), crash: None }
    }

    /// Test hook: `hook` runs after every [`Step`] (a crash test aborts the process in it).
    pub fn crash_at(&mut self, hook: fn(Step)) {
        self.crash = Some(hook);
    }

    fn step(&self, step: Step) {
        if let Some(hook) = self.crash {
            hook(step);
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of version `version` (whether or not it is installed).
    pub fn version_dir(&self, version: u64) -> PathBuf {
        self.root.join("versions").join(version.to_string())
    }

    pub fn installed(&self, version: u64) -> bool {
        self.version_dir(version).is_dir()
    }

    /// The version `current` names, if any.
    pub fn current(&self) -> Result<Option<u64>, StoreError> {
        self.link("current")
    }

    /// The version `previous` names, if any (and if still kept).
    pub fn previous(&self) -> Result<Option<u64>, StoreError> {
        self.link("previous")
    }

    fn link(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let path = self.root.join(name);
        match fs::read_link(&path) {
            Ok(target) => Ok(target
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .filter(|v| self.installed(*v))),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(StoreError::Io { path, error }),
        }
    }

    /// Writes `build`'s files (read from `open`) into staging, checks each against the
    /// manifest, and only then installs the whole version at once, with the OS releases it
    /// runs on. A version already installed is left as it is.
    pub fn stage(
        &self,
        version: u64,
        build: &AgentBuild,
        os_releases: OsReleases,
        mut open: impl FnMut(&AgentFile) -> io::Result<Box<dyn Read>>,
    ) -> Result<(), StoreError> {
        self.stage_with(version, build, os_releases, |file, path| {
            let mut source = open(file)?;
            let mut out = File::create(path)?;
            // At most one byte more than declared is read: an endless source ends here.
            io::copy(&mut (&mut source).take(file.size + 1), &mut out)?;
            out.sync_all()
        })
    }

    /// As [`AgentStore::stage`], with each file hard-linked from `source` (the agent's file
    /// cache, on the same data partition), so a release does not take its size twice there;
    /// copied where a link cannot be made. Checked against the manifest like copied bytes.
    /// The link shares the cache file's inode: the cache writes only groups it has not yet
    /// verified, so never again into a complete file.
    pub fn stage_linked(
        &self,
        version: u64,
        build: &AgentBuild,
        os_releases: OsReleases,
        mut source: impl FnMut(&AgentFile) -> PathBuf,
    ) -> Result<(), StoreError> {
        self.stage_with(version, build, os_releases, |file, path| {
            let from = source(file);
            match fs::hard_link(&from, path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::CrossesDevices => {
                    fs::copy(&from, path)?;
                    File::open(path)?.sync_all()
                }
                Err(error) => Err(error),
            }
        })
    }

    /// Stages `build`: `place` puts each file at its path in staging, then it is checked.
    fn stage_with(
        &self,
        version: u64,
        build: &AgentBuild,
        os_releases: OsReleases,
        mut place: impl FnMut(&AgentFile, &Path) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        if self.installed(version) {
            return Ok(());
        }
        let staging = self.root.join("staging").join(version.to_string());
        // What an interrupted attempt left (a store opened with `at` is not cleaned).
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_at(&staging))?;
        }
        let versions = self.root.join("versions");
        fs::create_dir_all(&versions).map_err(io_at(&versions))?;
        let result =
            (|| {
                for file in &build.files {
                    let path = staging.join(&file.path);
                    let parent = path.parent().expect("a file inside staging");
                    fs::create_dir_all(parent).map_err(io_at(parent))?;
                    place(file, &path).map_err(io_at(&path))?;
                    let expected =
                        ImageInfo { size: file.size, blake3: file.blake3, sha256: file.sha256 };
                    let written = File::open(&path).map_err(io_at(&path))?;
                    ImageDigest::check(written, &expected).map_err(|error| {
                        StoreError::Mismatch { version, file: file.path.clone(), error }
                    })?;
                    set_mode(&path, if file.executable { 0o755 } else { 0o644 })?;
                    self.step(Step::FileStaged);
                }
                sync_tree(&staging)
            })();
        if let Err(error) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(error);
        }
        // What the launcher starts, beside the version (not among its files): written first,
        // so an installed version always has it.
        let entries = self.root.join("entries");
        fs::create_dir_all(&entries).map_err(io_at(&entries))?;
        let entry = entries.join(version.to_string());
        fs::write(&entry, &build.entry).map_err(io_at(&entry))?;
        File::open(&entry).and_then(|f| f.sync_all()).map_err(io_at(&entry))?;
        sync_dir(&entries)?;
        let os = self.root.join("os");
        fs::create_dir_all(&os).map_err(io_at(&os))?;
        let range = serde_json::to_vec(&os_releases).expect("plain data");
        write_synced(&os.join(version.to_string()), &range)?;
        let installed = self.version_dir(version);
        fs::rename(&staging, &installed).map_err(io_at(&installed))?;
        sync_dir(&self.root.join("versions"))?;
        self.step(Step::VersionInstalled);
        Ok(())
    }

    /// Makes installed version `version` current, all files at once; the one current until
    /// now becomes `previous` and is retired as of `now`.
    pub fn switch(&self, version: u64, now: Timestamp) -> Result<(), StoreError> {
        if !self.installed(version) {
            return Err(StoreError::NotInstalled(version));
        }
        let old = self.current()?;
        if old == Some(version) {
            return Ok(());
        }
        // Retired first: whatever a crash leaves linked, the old version counts as one that
        // ran, kept for its seven days (a current version is never pruned anyway).
        if let Some(old) = old {
            let path = self.root.join("retired").join(old.to_string());
            write_synced(&path, now.as_second().to_string().as_bytes())?;
        }
        // Two renames; a crash between them must leave both versions reachable. Forward,
        // `previous` first: in between, both links name the old version, which is current.
        // Back to `previous` (a rollback), `current` first: in between, both name the target.
        if self.previous()? == Some(version) {
            self.replace_link("current", version)?;
            self.step(Step::Switched);
            if let Some(old) = old {
                self.replace_link("previous", old)?;
                self.step(Step::PreviousLinked);
            }
        } else {
            if let Some(old) = old {
                self.replace_link("previous", old)?;
                self.step(Step::PreviousLinked);
            }
            self.replace_link("current", version)?;
            self.step(Step::Switched);
        }
        // A version made current again is not retired.
        let _ = fs::remove_file(self.root.join("retired").join(version.to_string()));
        Ok(())
    }

    /// The OS releases installed version `version` runs on; `None` if not recorded (a
    /// version installed before they were).
    pub fn os_releases(&self, version: u64) -> Option<OsReleases> {
        let bytes = fs::read(self.root.join("os").join(version.to_string())).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The program of installed version `version` (its build's entry).
    pub fn entry(&self, version: u64) -> Result<PathBuf, StoreError> {
        let path = self.root.join("entries").join(version.to_string());
        let entry = fs::read_to_string(&path).map_err(io_at(&path))?;
        Ok(self.version_dir(version).join(entry.trim()))
    }

    /// The version the running agent last confirmed (wrote to `confirmed` after a successful
    /// check-in), if any.
    pub fn confirmed(&self) -> Option<u64> {
        fs::read_to_string(self.root.join(CONFIRMED)).ok().and_then(|t| t.trim().parse().ok())
    }

    /// For the agent: records that version `version` checked in successfully.
    pub fn confirm(root: &Path, version: u64) -> Result<(), StoreError> {
        write_synced(&root.join(CONFIRMED), version.to_string().as_bytes())
    }

    /// Runs the image's own agent from now on: `current` is removed (`previous` stays).
    pub fn use_image(&self, now: Timestamp) -> Result<(), StoreError> {
        let Some(old) = self.current()? else { return Ok(()) };
        let path = self.root.join("retired").join(old.to_string());
        write_synced(&path, now.as_second().to_string().as_bytes())?;
        let link = self.root.join("current");
        fs::remove_file(&link).map_err(io_at(&link))?;
        sync_dir(&self.root)
    }

    /// Makes `previous` current again (the launcher's rollback).
    pub fn roll_back(&self, now: Timestamp) -> Result<u64, StoreError> {
        let previous = self.previous()?.ok_or(StoreError::NoPrevious)?;
        self.switch(previous, now)?;
        Ok(previous)
    }

    /// Removes versions retired at least [`KEEP_RETIRED`] before `now` (`previous` too: then
    /// there is no rollback), and installed versions that were never current and are not
    /// `current` or `previous` now (left by a switch that never happened): call it when no
    /// staged version is waiting for its switch. Returns what it removed.
    pub fn prune(&self, now: Timestamp) -> Result<Vec<u64>, StoreError> {
        let (current, previous) = (self.current()?, self.previous()?);
        let versions_dir = self.root.join("versions");
        let mut removed = Vec::new();
        for entry in fs::read_dir(&versions_dir).map_err(io_at(&versions_dir))? {
            let entry = entry.map_err(io_at(&versions_dir))?;
            let Some(version) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if Some(version) == current {
                continue;
            }
            let retired = self.retired_at(version)?;
            let expired = retired.is_some_and(|at| now.duration_since(at) >= KEEP_RETIRED);
            let never_current = retired.is_none() && Some(version) != previous;
            if !(expired || never_current) {
                continue;
            }
            if Some(version) == previous {
                let link = self.root.join("previous");
                fs::remove_file(&link).map_err(io_at(&link))?;
            }
            // Out of `versions/` in one rename before it is deleted: a crash half-way through
            // the deletion must not leave a partial directory that looks installed (`open`
            // empties `staging/`).
            let trash = self.root.join("staging").join(format!("removing-{version}"));
            fs::rename(entry.path(), &trash).map_err(io_at(&trash))?;
            sync_dir(&versions_dir)?;
            fs::remove_dir_all(&trash).map_err(io_at(&trash))?;
            let _ = fs::remove_file(self.root.join("retired").join(version.to_string()));
            let _ = fs::remove_file(self.root.join("entries").join(version.to_string()));
            let _ = fs::remove_file(self.root.join("os").join(version.to_string()));
            removed.push(version);
        }
        removed.sort_unstable();
        Ok(removed)
    }

    fn retired_at(&self, version: u64) -> Result<Option<Timestamp>, StoreError> {
        let path = self.root.join("retired").join(version.to_string());
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().ok().and_then(|s| Timestamp::from_second(s).ok())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(StoreError::Io { path, error }),
        }
    }

    /// Points link `name` at `versions/<version>`: a new link, renamed over the old one.
    fn replace_link(&self, name: &str, version: u64) -> Result<(), StoreError> {
        let temporary = self.root.join(format!("{name}.new"));
        let _ = fs::remove_file(&temporary);
        let target = Path::new("versions").join(version.to_string());
        std::os::unix::fs::symlink(&target, &temporary).map_err(io_at(&temporary))?;
        let link = self.root.join(name);
        fs::rename(&temporary, &link).map_err(io_at(&link))?;
        sync_dir(&self.root)
    }
}

/// Replaces `path` with `bytes` by a synced new file renamed over it: after a power cut the
/// file holds the old bytes or the new ones, never a part.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let temporary = path.with_extension("new");
    let mut file = File::create(&temporary).map_err(io_at(&temporary))?;
    std::io::Write::write_all(&mut file, bytes).map_err(io_at(&temporary))?;
    file.sync_all().map_err(io_at(&temporary))?;
    fs::rename(&temporary, path).map_err(io_at(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_at(path))
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|dir| dir.sync_all()).map_err(io_at(path))
}

/// Syncs every directory under `root` (files were synced as they were written).
fn sync_tree(root: &Path) -> Result<(), StoreError> {
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let path = entry.map_err(io_at(&dir))?.path();
            if path.is_dir() {
                pending.push(path);
            }
        }
        sync_dir(&dir)?;
    }
    Ok(())
}
