//! The coordinator's image store: for each release `<blake3>.data` and `<blake3>.obao4` (its
//! pre-order outboard, the iroh-blobs layout) in one directory. Images are checked against
//! their manifest before they are moved in, so everything here has verified.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use sitecast_iso::{BlobLayout, FileDevice, OutboardStore};
use sitecast_manifest::{Blake3Hash, ImageDigest, ImageError, ImageInfo};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("image does not match the manifest: {0}")]
    Mismatch(#[from] ImageError),
    #[error("image store: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("incoming"))?;
        Ok(Self { dir: dir.to_owned() })
    }

    pub fn data_path(&self, hash: &Blake3Hash) -> PathBuf {
        self.dir.join(format!("{hash}.data"))
    }

    pub fn outboard_path(&self, hash: &Blake3Hash) -> PathBuf {
        self.dir.join(format!("{hash}.obao4"))
    }

    /// A fresh path for an upload in progress (same filesystem, so the import is a rename).
    pub fn incoming_path(&self) -> PathBuf {
        let mut name = [0u8; 8];
        // Without randomness the name is still unique per process and time; a clash only
        // fails one upload.
        if getrandom::fill(&mut name).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            name = (nanos.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
        }
        self.dir.join("incoming").join(format!("upload-{}", hex::encode(name)))
    }

    /// Checks `incoming` against `image`, computes its outboard and moves both into place.
    /// Blocking: run it off the async executor.
    pub fn import(&self, incoming: &Path, image: &ImageInfo) -> Result<(), ImportError> {
        let result = self.import_inner(incoming, image);
        if result.is_err() {
            let _ = fs::remove_file(incoming);
        }
        result
    }

    fn import_inner(&self, incoming: &Path, image: &ImageInfo) -> Result<(), ImportError> {
        ImageDigest::check(File::open(incoming)?, image)?;
        let outboard_path = self.outboard_path(&image.blake3);
        let partial = outboard_path.with_extension("obao4.partial");
        {
            let layout = BlobLayout::new(image.blake3, image.size);
            let device = FileDevice::open_or_create(&partial)?;
            let mut outboard = OutboardStore::new(layout, device);
            let root = outboard.compute_from(File::open(incoming)?)?;
            if root != image.blake3 {
                return Err(ImportError::Io(io::Error::other(
                    "image changed while it was imported",
                )));
            }
        }
        fs::rename(&partial, &outboard_path)?;
        fs::rename(incoming, self.data_path(&image.blake3))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Brings a file already on this server in without copying it where the filesystem allows
    /// (a hard link), then imports it like an upload.
    pub fn import_path(&self, source: &Path, image: &ImageInfo) -> Result<(), ImportError> {
        let incoming = self.incoming_path();
        if fs::hard_link(source, &incoming).is_err() {
            fs::copy(source, &incoming)?;
        }
        self.import(&incoming, image)
    }

    /// Data and outboard of a stored image, for serving.
    pub fn open_image(
        &self,
        image: &ImageInfo,
    ) -> io::Result<(FileDevice, OutboardStore<FileDevice>)> {
        let data = FileDevice::open(&self.data_path(&image.blake3))?;
        let layout = BlobLayout::new(image.blake3, image.size);
        let outboard =
            OutboardStore::new(layout, FileDevice::open(&self.outboard_path(&image.blake3))?);
        Ok((data, outboard))
    }
}
