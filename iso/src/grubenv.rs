//! GRUB's environment block: exactly 1024 bytes, `# GRUB Environment Block\n`, then
//! `name=value\n` lines, then `#` padding. Values escape `\` and newline with a backslash, as
//! `grub-editenv` does.
//!
//! Userspace rewrites the block in place, as GRUB's own `save_env` does, and syncs it: GRUB
//! reads the file system without replaying ext4's journal, so a file replaced by rename (a
//! journaled metadata change) stays invisible to GRUB until the journal is checkpointed; a
//! power cut before that, and GRUB boots from the old block while Linux, after its journal
//! replay, reads the new one; worse, GRUB's `save_env` then writes into the old file's blocks,
//! which the rename freed. An in-place rewrite changes no metadata. When the old and the new
//! variables both fit in the first 512-byte sector (ours always do), only that sector is
//! written, and a disk writes a sector whole, so a cut leaves the old or the new variables;
//! otherwise the whole block is rewritten (a cut between its sectors could mix them). An
//! existing file is never replaced: only a missing or malformed one is created (temporary
//! file, fsync, rename, fsync the directory), which belongs to provisioning, before GRUB
//! relies on it. The file must stay exactly 1024 bytes on a plain file system.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::device::PowerSupply;

pub const ENV_BLOCK_BYTES: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("environment block is {0} bytes, GRUB's is exactly 1024")]
    WrongSize(usize),
    #[error("environment block does not start with {HEADER:?}")]
    NoHeader,
    #[error("environment block line {0:?} is not name=value")]
    BadLine(String),
    #[error("variable name {0:?} is not allowed")]
    BadName(String),
    #[error("variables need {0} bytes, more than fit in the 1024-byte block")]
    TooLong(usize),
    #[error("environment file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The variables of one environment block, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl GrubEnv {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) -> Result<(), EnvError> {
        if name.is_empty() || name.contains(['=', '\n', '\\', '#']) {
            return Err(EnvError::BadName(name.to_owned()));
        }
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(n, _)| n != name);
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn parse(block: &[u8]) -> Result<Self, EnvError> {
        if block.len() != ENV_BLOCK_BYTES {
            return Err(EnvError::WrongSize(block.len()));
        }
        let body = block.strip_prefix(HEADER.as_bytes()).ok_or(EnvError::NoHeader)?;
        let text = String::from_utf8_lossy(body);
        let mut env = Self::default();
        let mut chars = text.chars().peekable();
        let mut line = String::new();
        // Unescape while splitting: `\` + char is that char, so an escaped newline is data.
        let mut lines = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => line.push(chars.next().unwrap_or('\\')),
                '\n' => lines.push(std::mem::take(&mut line)),
                _ => line.push(c),
            }
        }
        for line in lines {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, value) =
                line.split_once('=').ok_or_else(|| EnvError::BadLine(line.clone()))?;
            env.vars.push((name.to_owned(), value.to_owned()));
        }
        Ok(env)
    }

    pub fn encode(&self) -> Result<[u8; ENV_BLOCK_BYTES], EnvError> {
        let mut text = String::from(HEADER);
        for (name, value) in &self.vars {
            text.push_str(name);
            text.push('=');
            for c in value.chars() {
                if c == '\\' || c == '\n' {
                    text.push('\\');
                }
                text.push(c);
            }
            text.push('\n');
        }
        if text.len() > ENV_BLOCK_BYTES {
            return Err(EnvError::TooLong(text.len()));
        }
        let mut block = [b'#'; ENV_BLOCK_BYTES];
        block[..text.len()].copy_from_slice(text.as_bytes());
        Ok(block)
    }
}

/// Where the environment block is kept.
pub trait EnvStore {
    /// The current block, or `None` if there is none yet.
    fn load(&self) -> Result<Option<GrubEnv>, EnvError>;
    /// Replaces the block atomically: after a crash either the old or the new one is there.
    fn store(&mut self, env: &GrubEnv) -> Result<(), EnvError>;
}

/// The `grubenv` file on the boot partition.
#[derive(Debug, Clone)]
pub struct EnvFile {
    path: PathBuf,
}

impl EnvFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> EnvError {
        EnvError::Io { path: self.path.clone(), source }
    }

    /// The env file opened for an in-place rewrite, with its current bytes, if it is a whole
    /// 1024-byte block.
    fn existing_block(&self) -> Result<Option<(File, Vec<u8>)>, EnvError> {
        let file = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(self.io(error)),
        };
        let mut old = vec![0; ENV_BLOCK_BYTES];
        match file.read_exact_at(&mut old, 0) {
            Ok(()) if file.metadata().map_err(|e| self.io(e))?.len() == ENV_BLOCK_BYTES as u64 => {
                Ok(Some((file, old)))
            }
            Ok(()) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(error) => Err(self.io(error)),
        }
    }
}

/// What a disk writes whole: when the old and new variables end inside it, only it is written.
const SECTOR: usize = 512;

impl EnvStore for EnvFile {
    fn load(&self) -> Result<Option<GrubEnv>, EnvError> {
        match fs::read(&self.path) {
            Ok(block) => GrubEnv::parse(&block).map(Some),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(self.io(error)),
        }
    }

    fn store(&mut self, env: &GrubEnv) -> Result<(), EnvError> {
        let block = env.encode()?;
        if let Some((file, old)) = self.existing_block()? {
            // Every line ends in a newline, so padding alone after the first sector means
            // every variable is inside it.
            let padding = |b: &[u8]| b[SECTOR..].iter().all(|&c| c == b'#');
            let len = if padding(&block) && padding(&old) { SECTOR } else { ENV_BLOCK_BYTES };
            return file
                .write_all_at(&block[..len], 0)
                .and_then(|()| file.sync_data())
                .map_err(|error| self.io(error));
        }
        let dir =
            self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name =
            self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = dir.join(format!(".{name}.new"));
        let write = || -> io::Result<()> {
            let mut file =
                OpenOptions::new().write(true).create(true).truncate(true).open(&temp)?;
            file.write_all(&block)?;
            file.sync_all()?;
            fs::rename(&temp, &self.path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|error| self.io(error))
    }
}

/// Crash-testing store: `store` is one operation on the power supply and atomic, like the
/// one-sector rewrite of [`EnvFile`].
#[derive(Debug, Clone)]
pub struct CrashEnvStore {
    block: std::sync::Arc<std::sync::Mutex<Option<[u8; ENV_BLOCK_BYTES]>>>,
    power: PowerSupply,
}

impl CrashEnvStore {
    pub fn new(power: PowerSupply) -> Self {
        Self { block: Default::default(), power }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<[u8; ENV_BLOCK_BYTES]>> {
        self.block.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What GRUB does at boot: rewrite the block in place (not through the power supply).
    pub fn grub_save(&self, env: &GrubEnv) -> Result<(), EnvError> {
        *self.lock() = Some(env.encode()?);
        Ok(())
    }
}

impl EnvStore for CrashEnvStore {
    fn load(&self) -> Result<Option<GrubEnv>, EnvError> {
        self.lock().as_ref().map(|b| GrubEnv::parse(b)).transpose()
    }

    fn store(&mut self, env: &GrubEnv) -> Result<(), EnvError> {
        let block = env.encode()?;
        self.power
            .operate()
            .map_err(|source| EnvError::Io { path: "<crash env>".into(), source })?;
        *self.lock() = Some(block);
        Ok(())
    }
}
