//! The image's outboard, fetched whole from Central Command and checked before use (its top
//! pair must chain to the signed root): what mirrors' bytes and the active slot's are
//! verified against. Streamed to a temporary file and renamed into place once whole, so a
//! file at its path is always a complete one, and one left by an earlier start is used again.

use std::path::Path;
use std::time::Duration;

use sitecast_iso::{BlobLayout, FileDevice, OutboardStore};

use crate::coordinator::{ClientError, CoordinatorClient};

/// An outboard from Central Command that sends nothing for this long is given up.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum OutboardError {
    #[error("fetching the outboard: {0}")]
    Fetch(#[from] ClientError),
    #[error("the outboard is {got} bytes, not {want}")]
    Length { got: u64, want: u64 },
    #[error("the outboard stalled: nothing for {0:?}")]
    Stalled(Duration),
    #[error("the outboard does not chain to the signed root")]
    Root,
    #[error("storing the outboard: {0}")]
    Io(#[from] std::io::Error),
}

/// The outboard of `layout`'s image from `url`, kept at `path`.
pub async fn fetch(
    client: &CoordinatorClient,
    url: &str,
    layout: BlobLayout,
    path: &Path,
) -> Result<OutboardStore<FileDevice>, OutboardError> {
    let want = layout.outboard_len();
    if !tokio::fs::metadata(path).await.is_ok_and(|m| m.len() == want) {
        download(client, url, want, path).await?;
    }
    let outboard = OutboardStore::new(layout, FileDevice::open_read_only(path)?);
    if !outboard.root_matches()? {
        let _ = tokio::fs::remove_file(path).await;
        return Err(OutboardError::Root);
    }
    Ok(outboard)
}

/// Streams `want` bytes from `url` into `path` through a temporary file.
async fn download(
    client: &CoordinatorClient,
    url: &str,
    want: u64,
    path: &Path,
) -> Result<(), OutboardError> {
    let partial = path.with_extension("partial");
    let result = write_partial(client, url, want, &partial).await;
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
) -> Result<(), OutboardError> {
    use tokio::io::AsyncWriteExt;
    let mut response = client.open_download(url).await?;
    let mut file = tokio::fs::File::create(partial).await?;
    let mut got = 0u64;
    loop {
        let chunk = tokio::time::timeout(IDLE, response.chunk())
            .await
            .map_err(|_| OutboardError::Stalled(IDLE))?
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let Some(chunk) = chunk else { break };
        got += chunk.len() as u64;
        // Never more than was asked for, whatever the server sends.
        if got > want {
            break;
        }
        file.write_all(&chunk).await?;
    }
    if got != want {
        return Err(OutboardError::Length { got, want });
    }
    file.sync_all().await?;
    Ok(())
}
