//! Files a download needs besides the image's groups, fetched whole from Central Command
//! and checked before use: the image's outboard (its top pair must chain to the signed root)
//! and its content index (its length and BLAKE3 must be the ones the manifest signs). Each
//! is streamed to a temporary file and renamed into place once whole, so a file at its path
//! is always a complete one, and one left by an earlier start is used again.

use std::path::Path;
use std::time::Duration;

use sitecast_iso::{BlobLayout, FileDevice, OutboardStore};
use sitecast_manifest::ContentIndex;

use crate::coordinator::{ClientError, CoordinatorClient};

/// A file from Central Command that sends nothing for this long is given up.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SideFileError {
    #[error("fetching it: {0}")]
    Fetch(#[from] ClientError),
    #[error("it is {got} bytes, not {want}")]
    Length { got: u64, want: u64 },
    #[error("it stalled: nothing for {0:?}")]
    Stalled(Duration),
    #[error("the outboard does not chain to the signed root")]
    OutboardRoot,
    #[error("its BLAKE3 is not the one the manifest signs")]
    IndexHash,
    #[error("storing it: {0}")]
    Io(#[from] std::io::Error),
}

/// The outboard of `layout`'s image from `url`, kept at `path`.
pub async fn outboard(
    client: &CoordinatorClient,
    url: &str,
    layout: BlobLayout,
    path: &Path,
) -> Result<OutboardStore<FileDevice>, SideFileError> {
    let want = layout.outboard_len();
    if !tokio::fs::metadata(path).await.is_ok_and(|m| m.len() == want) {
        download(client, url, want, path, None).await?;
    }
    let outboard = OutboardStore::new(layout, FileDevice::open_read_only(path)?);
    if !outboard.root_matches()? {
        let _ = tokio::fs::remove_file(path).await;
        return Err(SideFileError::OutboardRoot);
    }
    Ok(outboard)
}

/// The content index the manifest signs as `index`, from `url`, kept at `path`.
pub async fn content_index(
    client: &CoordinatorClient,
    url: &str,
    index: &ContentIndex,
    path: &Path,
) -> Result<(), SideFileError> {
    let (kept, want) = (path.to_owned(), (index.size, blake3::Hash::from(index.blake3)));
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, blake3::Hash)> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(kept)?)?;
        Ok((hasher.count(), hasher.finalize()))
    });
    if !hashed.await.is_ok_and(|hashed| hashed.is_ok_and(|got| got == want)) {
        download(client, url, index.size, path, Some(index.blake3)).await?;
    }
    Ok(())
}

/// Streams `want` bytes from `url` into `path` through a temporary file; with `hash`, the
/// bytes must hash to it.
async fn download(
    client: &CoordinatorClient,
    url: &str,
    want: u64,
    path: &Path,
    hash: Option<sitecast_manifest::Blake3Hash>,
) -> Result<(), SideFileError> {
    let partial = path.with_extension("partial");
    let result = write_partial(client, url, want, &partial, hash).await;
    match result {
        Ok(()) => Ok(tokio::fs::rename(&partial, path).await?),
        Err(error) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(error)
        }
    }
}

async fn write_partial(
    client: &CoordinatorClient,
    url: &str,
    want: u64,
    partial: &Path,
    hash: Option<sitecast_manifest::Blake3Hash>,
) -> Result<(), SideFileError> {
    use tokio::io::AsyncWriteExt;
    let mut response = client.open_download(url).await?;
    let mut file = tokio::fs::File::create(partial).await?;
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    loop {
        let chunk = tokio::time::timeout(IDLE, response.chunk())
            .await
            .map_err(|_| SideFileError::Stalled(IDLE))?
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let Some(chunk) = chunk else { break };
        got += chunk.len() as u64;
        // Never more than was asked for, whatever the server sends.
        if got > want {
            break;
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    if got != want {
        return Err(SideFileError::Length { got, want });
    }
    if hash.is_some_and(|hash| hasher.finalize() != blake3::Hash::from(hash)) {
        return Err(SideFileError::IndexHash);
    }
    file.sync_all().await?;
    Ok(())
}
