//! The coordinator's image store: for each release `<blake3>.data` and `<blake3>.obao4` (its
//! pre-order outboard, the iroh-blobs layout) in one directory. Images are checked against
//! their manifest before they are moved in, so everything here has verified.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::os::unix::fs::FileExt;

use sitecast_delta::index::IndexReader;
use sitecast_delta::plan::{self, PlanHeader};
use sitecast_delta::reuse::OlderImage;
use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, write_group_hashes};
use sitecast_manifest::{Blake3Hash, ContentIndex, ImageDigest, ImageError, ImageInfo};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("image does not match the manifest: {0}")]
    Mismatch(#[from] ImageError),
    #[error("image store: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the image's content index is {got_size} bytes with BLAKE3 {got}, the manifest signs \
         {want_size} bytes with BLAKE3 {want}: sign the release again with this version of \
         sitecast-manifest (or with --no-index: appliances then fetch the whole image)"
    )]
    IndexMismatch { got: Blake3Hash, got_size: u64, want: Blake3Hash, want_size: u64 },
    #[error(
        "the manifest's index chunk sizes {min}/{avg}/{max} are not ones FastCDC takes: sign \
         the release again with this version of sitecast-manifest (or with --no-index)"
    )]
    IndexChunks { min: u32, avg: u32, max: u32 },
}

fn invalid(error: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

/// What serving a stored blob needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub blake3: Blake3Hash,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    /// Whether each blob's ranges are worth compressing ([`crate::wire`]), measured once.
    compresses: Arc<Mutex<HashMap<Blake3Hash, bool>>>,
}

impl BlobStore {
    /// Opens the store, removing what an interrupted upload or import left behind (the
    /// caller holds the data directory's database lock, so no other process is importing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("incoming"))?;
        for entry in fs::read_dir(dir.join("incoming"))? {
            fs::remove_file(entry?.path())?;
        }
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                fs::remove_file(path)?;
            }
        }
        Ok(Self { dir: dir.to_owned(), compresses: Arc::default() })
    }

    pub fn data_path(&self, hash: &Blake3Hash) -> PathBuf {
        self.dir.join(format!("{hash}.data"))
    }

    pub fn outboard_path(&self, hash: &Blake3Hash) -> PathBuf {
        self.dir.join(format!("{hash}.obao4"))
    }

    /// Makes the content index of a stored image as its manifest describes it and stores it
    /// as a blob of its own (data and outboard, served like an image's), only if it is the
    /// index the manifest signs. Blocking: run it off the async executor.
    pub fn make_index(&self, image: &ImageInfo, index: &ContentIndex) -> Result<(), ImportError> {
        let chunking = index.chunking();
        if !chunking.is_valid() {
            let sitecast_delta::Chunking { min, avg, max } = chunking;
            return Err(ImportError::IndexChunks { min, avg, max });
        }
        let incoming = self.incoming_path();
        let made = File::create(&incoming).and_then(|out| {
            let data = File::open(self.data_path(&image.blake3))?;
            let data = io::BufReader::with_capacity(1 << 20, data);
            let made = ContentIndex::make(data, chunking, &out)?;
            out.sync_all()?;
            Ok(made)
        });
        let made = match made {
            Ok(made) if made == *index => Ok(()),
            Ok(made) => Err(ImportError::IndexMismatch {
                got: made.blake3,
                got_size: made.size,
                want: index.blake3,
                want_size: index.size,
            }),
            Err(error) => Err(error.into()),
        };
        match made {
            Ok(()) => self.import(&incoming, &index.file()),
            Err(error) => {
                let _ = fs::remove_file(&incoming);
                Err(error)
            }
        }
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

    /// Stores the outboard of the stored image `image` as a blob of its own (a copy, with its
    /// own outboard), so that appliances can fetch it as verified ranges from each other
    /// instead of each from Central Command; its digest. Blocking.
    pub fn outboard_as_blob(&self, image: &ImageInfo) -> Result<ImageDigest, ImportError> {
        if fs::metadata(self.outboard_path(&image.blake3))?.len() == 0 {
            // One group: no parents, nothing to share.
            return Ok(ImageDigest::of_reader(io::empty())?);
        }
        self.import_made(|incoming| {
            fs::copy(self.outboard_path(&image.blake3), incoming)?;
            File::open(incoming)?.sync_all()
        })
    }

    /// Stores the group hashes of the stored image `image` ([`write_group_hashes`]) as a blob
    /// of its own: half its outboard, which appliances fetch instead and rebuild the outboard
    /// from; its digest. Blocking.
    pub fn group_hashes_as_blob(&self, image: &ImageInfo) -> Result<ImageDigest, ImportError> {
        let layout = BlobLayout::new(image.blake3, image.size);
        if layout.group_hashes_len() == 0 {
            return Ok(ImageDigest::of_reader(io::empty())?);
        }
        self.import_made(|incoming| {
            let data = File::open(self.data_path(&image.blake3))?;
            let mut out = io::BufWriter::new(File::create(incoming)?);
            let root = write_group_hashes(layout, data, &mut out)?;
            if root != image.blake3 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the stored image {} hashes to {root}", image.blake3),
                ));
            }
            out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
        })
    }

    /// Stores, as a blob of its own, the plan for updating to the stored image `to` (with its
    /// stored content index `to_index` and group hashes `group_hashes`) from the stored image
    /// `from` (with its index `from_index`): `sitecast_delta::plan`, worked out from the two
    /// indexes; its digest. An error when the indexes were cut differently or the pair shares
    /// too little in long stretches for a plan. Blocking.
    pub fn plan_as_blob(
        &self,
        from: BlobInfo,
        from_index: &Blake3Hash,
        to: &ImageInfo,
        to_index: &Blake3Hash,
        group_hashes: &Blake3Hash,
    ) -> Result<ImageDigest, ImportError> {
        let older = IndexReader::new(File::open(self.data_path(from_index))?, from.size)
            .map_err(invalid)?;
        let newer =
            IndexReader::new(File::open(self.data_path(to_index))?, to.size).map_err(invalid)?;
        if older.chunking() != newer.chunking() {
            return Err(invalid("the two releases' indexes were cut with other chunk sizes").into());
        }
        let older = OlderImage::from_index(older).map_err(invalid)?;
        let runs = plan::runs_between(&older, newer, to.size)
            .map_err(invalid)?
            .ok_or_else(|| invalid("the images share too little in long stretches"))?;
        drop(older);
        let hashes = File::open(self.data_path(group_hashes))?;
        let header = PlanHeader {
            from_blake3: *from.blake3.as_bytes(),
            from_size: from.size,
            to_size: to.size,
        };
        self.import_made(|incoming| {
            let mut out = io::BufWriter::new(File::create(incoming)?);
            let group_hash = |group: u64| {
                let mut hash = [0u8; 32];
                hashes.read_exact_at(&mut hash, group * 32).map(|()| hash)
            };
            plan::write(header, &runs, group_hash, &mut out).map_err(invalid)?;
            out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
        })
    }

    /// Imports, as a blob of its own, the file `make` writes (and syncs) at a fresh incoming
    /// path; its digest. Nothing is left behind if making or importing it fails. Blocking.
    fn import_made(
        &self,
        make: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Result<ImageDigest, ImportError> {
        let incoming = self.incoming_path();
        let made = make(&incoming).and_then(|()| ImageDigest::of_reader(File::open(&incoming)?));
        let digest = match made {
            Ok(digest) => digest,
            Err(error) => {
                let _ = fs::remove_file(&incoming);
                return Err(error.into());
            }
        };
        let file = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
        self.import(&incoming, &file)?;
        Ok(digest)
    }

    /// Copies a file already on this server in, then imports it like an upload. A copy, not
    /// a link: the operator's file may be rewritten later, and the origin must go on serving
    /// the bytes that verified under this release's ETag.
    pub fn import_path(&self, source: &Path, image: &ImageInfo) -> Result<(), ImportError> {
        let incoming = self.incoming_path();
        let copied = fs::copy(source, &incoming).and_then(|_| File::open(&incoming)?.sync_all());
        if let Err(error) = copied {
            let _ = fs::remove_file(&incoming);
            return Err(error.into());
        }
        self.import(&incoming, image)
    }

    /// Data and outboard of a stored blob (an image, a file of an agent release), for serving.
    pub fn open_blob(
        &self,
        blob: &BlobInfo,
    ) -> io::Result<(FileDevice, OutboardStore<FileDevice>)> {
        let data = FileDevice::open_read_only(&self.data_path(&blob.blake3))?;
        let layout = BlobLayout::new(blob.blake3, blob.size);
        let outboard = FileDevice::open_read_only(&self.outboard_path(&blob.blake3))?;
        let outboard = OutboardStore::new(layout, outboard);
        Ok((data, outboard))
    }

    /// Whether verified ranges of `blob` are worth sending compressed ([`crate::wire`]):
    /// sampled the first time it is asked, then remembered. Blocking the first time.
    pub fn compresses(&self, blob: &BlobInfo) -> io::Result<bool> {
        let known = |map: &HashMap<Blake3Hash, bool>| map.get(&blob.blake3).copied();
        if let Some(known) = known(&self.compresses.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(known);
        }
        let data = FileDevice::open_read_only(&self.data_path(&blob.blake3))?;
        let compresses = crate::wire::compresses(&data, blob.size).unwrap_or_else(|error| {
            // Sent as it is, then: compression only saves bytes.
            tracing::warn!(%error, blob = %blob.blake3, "sampling a blob for compression failed");
            false
        });
        self.compresses.lock().unwrap_or_else(|p| p.into_inner()).insert(blob.blake3, compresses);
        Ok(compresses)
    }
}
