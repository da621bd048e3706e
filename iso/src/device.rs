//! Where bytes live: a slot, a progress record, an outboard. A tiny positioned-I/O trait with a
//! file implementation and a crash-testing one that keeps live and durable bytes apart.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Positioned reads and writes with an explicit durability point.
// `len` is a size in bytes that can fail, not a collection length.
#[allow(clippy::len_without_is_empty)]
pub trait Device {
    /// Usable bytes (a file's length, a block device's size).
    fn len(&self) -> io::Result<u64>;
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Everything written before returns only once it is durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// A file or block device. A slot on an appliance is a partition, in tests a file.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
}

impl FileDevice {
    /// Opens an existing file or device for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self { file, path: path.to_owned() })
    }

    /// Opens an existing file or device for reading only: for serving what is held, which may
    /// be a running program (a writer would get `ETXTBSY`). Writes fail.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).open(path)?;
        Ok(Self { file, path: path.to_owned() })
    }

    /// Opens a file, creating it (empty) if missing; for records kept beside a slot.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(Self { file, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

impl Device for FileDevice {
    fn len(&self) -> io::Result<u64> {
        let metadata = self.file.metadata()?;
        if metadata.is_file() {
            return Ok(metadata.len());
        }
        // Block devices report 0 in metadata; their size is where a seek to the end lands.
        use std::io::Seek;
        (&self.file).seek(io::SeekFrom::End(0))
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A shared power supply for crash tests: after a set number of writes and syncs across all
/// devices on it, the power is cut and every further operation fails.
#[derive(Debug, Clone, Default)]
pub struct PowerSupply(Arc<Mutex<Power>>);

#[derive(Debug, Default)]
struct Power {
    operations: u64,
    cut_after: Option<u64>,
    cut: bool,
}

impl PowerSupply {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the power at the `n`-th write or sync from now (0: the next one).
    pub fn cut_after(&self, n: u64) {
        let mut power = lock(&self.0);
        power.cut_after = Some(power.operations + n);
    }

    pub fn is_cut(&self) -> bool {
        lock(&self.0).cut
    }

    /// Operations counted so far (to enumerate every crash point of a flow).
    pub fn operations(&self) -> u64 {
        lock(&self.0).operations
    }

    /// Power back on, no cut scheduled.
    pub fn restore(&self) {
        let mut power = lock(&self.0);
        power.cut = false;
        power.cut_after = None;
    }

    /// Counts one operation; fails if the power is or goes off.
    pub fn operate(&self) -> io::Result<()> {
        let mut power = lock(&self.0);
        if power.cut {
            return Err(power_cut());
        }
        if power.cut_after == Some(power.operations) {
            power.cut = true;
            return Err(power_cut());
        }
        power.operations += 1;
        Ok(())
    }
}

fn power_cut() -> io::Error {
    io::Error::other("simulated power cut")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Crash-testing device: writes land in `live`; only `sync` makes them `durable`. A crash
/// keeps the durable bytes plus an arbitrary subset of the unsynced writes, as a disk may.
#[derive(Debug, Clone)]
pub struct CrashDevice {
    state: Arc<Mutex<CrashState>>,
    power: PowerSupply,
}

#[derive(Debug)]
struct CrashState {
    live: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
    read_only: bool,
}

impl CrashDevice {
    pub fn new(len: usize, power: PowerSupply) -> Self {
        let state = CrashState {
            live: vec![0; len],
            durable: vec![0; len],
            unsynced: Vec::new(),
            read_only: false,
        };
        Self { state: Arc::new(Mutex::new(state)), power }
    }

    /// Power loss and reboot: durable bytes stay, and each unsynced write survives if `keep`
    /// says so (in write order, so later writes may overwrite earlier survivors).
    pub fn crash(&self, mut keep: impl FnMut() -> bool) {
        let mut state = lock(&self.state);
        let mut after = state.durable.clone();
        for (offset, bytes) in std::mem::take(&mut state.unsynced) {
            if keep() {
                let start = offset as usize;
                after[start..start + bytes.len()].copy_from_slice(&bytes);
            }
        }
        state.durable = after.clone();
        state.live = after;
    }

    /// The bytes as they are now (what a reader sees before any crash).
    pub fn live(&self) -> Vec<u8> {
        lock(&self.state).live.clone()
    }

    pub fn set_read_only(&self, read_only: bool) {
        lock(&self.state).read_only = read_only;
    }

    /// Writes bytes straight to durable storage, bypassing the power supply (test set-up).
    pub fn preload(&self, offset: u64, bytes: &[u8]) {
        let mut state = lock(&self.state);
        let range = offset as usize..offset as usize + bytes.len();
        state.live[range.clone()].copy_from_slice(bytes);
        state.durable[range].copy_from_slice(bytes);
    }
}

impl Device for CrashDevice {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).live.len() as u64)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let state = lock(&self.state);
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let source = state
            .live
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.power.operate()?;
        let mut state = lock(&self.state);
        if state.read_only {
            return Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem));
        }
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let target = state
            .live
            .get_mut(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::StorageFull))?;
        target.copy_from_slice(buf);
        state.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.power.operate()?;
        let mut state = lock(&self.state);
        state.durable = state.live.clone();
        state.unsynced.clear();
        Ok(())
    }
}

/// `bao-tree` reads through `positioned_io`; this adapts any [`Device`] to it.
pub(crate) struct ReadAtDevice<'a, D: ?Sized>(pub(crate) &'a D);

impl<D: Device + ?Sized> bao_tree::io::sync::ReadAt for ReadAtDevice<'_, D> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        // Reads past the end are short, as for a file; bao-tree relies on that at the tail.
        let len = self.0.len()?;
        if pos >= len {
            return Ok(0);
        }
        let n = buf.len().min((len - pos) as usize);
        self.0.read_exact_at(pos, &mut buf[..n])?;
        Ok(n)
    }
}

/// And writes, for outboards kept on a [`Device`].
pub(crate) struct WriteAtDevice<'a, D: ?Sized>(pub(crate) &'a mut D);

impl<D: Device + ?Sized> bao_tree::io::sync::WriteAt for WriteAtDevice<'_, D> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all_at(pos, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `len` bytes of a device from the start: hashing a slot back, scanning one.
#[derive(Debug)]
pub struct DeviceReader<'a, D: ?Sized> {
    device: &'a D,
    position: u64,
    end: u64,
}

impl<'a, D: Device + ?Sized> DeviceReader<'a, D> {
    pub fn new(device: &'a D, len: u64) -> Self {
        Self { device, position: 0, end: len }
    }
}

impl<D: Device + ?Sized> io::Read for DeviceReader<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min((self.end - self.position) as usize);
        self.device.read_exact_at(self.position, &mut buf[..n])?;
        self.position += n as u64;
        Ok(n)
    }
}
