//! A release's mirrors: plain HTTP origins of its image (a CDN, an object store, nginx).
//!
//! A run of pieces is asked for by `Range`, one request per stretch of adjacent groups. The
//! bytes are encoded against the image's outboard (fetched once from Central Command; its top
//! pair checked against the signed root) and go through the same decoder as every other
//! response, so a mirror needs no trust: a byte it changes fails its group, and nothing of
//! that group is written. A mirror that fails or lies is not asked again by this download;
//! Central Command's verified ranges stay the fallback.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use sitecast_iso::{BlobLayout, FileDevice, GROUP_BYTES, OutboardStore};

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::swarm::FetchError;

/// A mirror that sends nothing for this long is given up for this download.
const MIRROR_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("fetching the outboard: {0}")]
    Outboard(#[from] ClientError),
    #[error("the outboard is {got} bytes, not {want}")]
    OutboardLength { got: u64, want: u64 },
    #[error("the outboard does not chain to the signed root")]
    OutboardRoot,
    #[error("storing the outboard: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// The mirrors of one download, in the order they are tried.
pub struct Mirrors {
    http: reqwest::Client,
    urls: Vec<String>,
    given_up: Mutex<Vec<bool>>,
    outboard: OutboardStore<FileDevice>,
    path: PathBuf,
}

impl std::fmt::Debug for Mirrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirrors").field("urls", &self.urls).finish_non_exhaustive()
    }
}

impl Mirrors {
    /// Mirrors of `layout`'s image at `urls`, with its outboard from `outboard_url` kept at
    /// `path` (a complete one left there by an earlier start is used again).
    pub async fn prepare(
        client: &CoordinatorClient,
        outboard_url: &str,
        urls: Vec<String>,
        layout: BlobLayout,
        path: PathBuf,
    ) -> Result<Self, MirrorError> {
        let want = layout.outboard_len();
        let kept = tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() == want);
        if !kept {
            download_outboard(client, outboard_url, want, &path).await?;
        }
        let device = FileDevice::open_read_only(&path)?;
        let outboard = OutboardStore::new(layout, device);
        if !outboard.root_matches()? {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(MirrorError::OutboardRoot);
        }
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        let http = match sitecast_tls::client_config(&sitecast_tls::Trust::SystemRoots) {
            Ok(tls) => http.tls_backend_preconfigured(tls),
            // No trust store here: plain-HTTP mirrors still work, https ones fail over.
            Err(_) => http,
        };
        let http = http.build().map_err(|e| MirrorError::Client(e.to_string()))?;
        let given_up = Mutex::new(vec![false; urls.len()]);
        Ok(Self { http, urls, given_up, outboard, path })
    }

    /// Where the outboard is kept: removed once the download is over.
    pub fn outboard_path(&self) -> &Path {
        &self.path
    }

    /// The first mirror not given up.
    pub(crate) fn current(&self) -> Option<usize> {
        self.given_up.lock().unwrap_or_else(|p| p.into_inner()).iter().position(|gone| !gone)
    }

    pub(crate) fn give_up(&self, index: usize, error: &FetchError) {
        let url = &self.urls[index];
        match error {
            FetchError::Corrupt(reason) => {
                tracing::warn!(%url, %reason, "a mirror sent bytes that do not verify; not asked again")
            }
            FetchError::Failed(reason) => {
                tracing::warn!(%url, %reason, "a mirror failed; not asked again")
            }
        }
        self.given_up.lock().unwrap_or_else(|p| p.into_inner())[index] = true;
    }

    /// The plain bytes of `groups` (adjacent groups of the image) from mirror `index`.
    pub(crate) async fn fetch(
        &self,
        index: usize,
        layout: BlobLayout,
        groups: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let bytes = groups.start * GROUP_BYTES..(groups.end * GROUP_BYTES).min(layout.size);
        let failed = |why: String| FetchError::Failed(why);
        let header = format!("bytes={}-{}", bytes.start, bytes.end - 1);
        let mut response = tokio::time::timeout(
            MIRROR_IDLE,
            self.http.get(&self.urls[index]).header(reqwest::header::RANGE, header).send(),
        )
        .await
        .map_err(|_| failed(format!("no answer for {MIRROR_IDLE:?}")))?
        .map_err(|e| failed(format!("unreachable: {e}")))?;
        let status = response.status();
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            // A 200 would be the whole image: not read.
            return Err(failed(format!("answered {status} to a Range request")));
        }
        let want = (bytes.end - bytes.start) as usize;
        let mut body = Vec::with_capacity(want);
        loop {
            let chunk = tokio::time::timeout(MIRROR_IDLE, response.chunk())
                .await
                .map_err(|_| failed(format!("nothing sent for {MIRROR_IDLE:?}")))?
                .map_err(|e| failed(format!("cut off: {e}")))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > want {
                return Err(FetchError::Corrupt("sent more than the range asked for".into()));
            }
            body.extend_from_slice(&chunk);
        }
        if body.len() != want {
            return Err(failed(format!("sent {} of {want} bytes", body.len())));
        }
        Ok(body.into())
    }

    /// The response encoding of `groups` made of `bytes` (their plain bytes) and the
    /// outboard's parents: unchecked here, checked by the decoder it is fed to.
    pub(crate) fn encode(&self, groups: Range<u64>, bytes: &[u8]) -> Result<Vec<u8>, FetchError> {
        let layout = self.outboard.layout();
        let mut encoded = Vec::with_capacity(layout.encoded_len(groups.clone()) as usize);
        self.outboard
            .encode_plain(groups.start * GROUP_BYTES, bytes, &[groups], &mut encoded)
            .map_err(|e| FetchError::Failed(format!("encoding against the outboard: {e}")))?;
        Ok(encoded)
    }
}

/// Streams the outboard into `path` through a temporary file, so that `path` only ever holds
/// a whole one.
async fn download_outboard(
    client: &CoordinatorClient,
    url: &str,
    want: u64,
    path: &Path,
) -> Result<(), MirrorError> {
    use tokio::io::AsyncWriteExt;
    let mut response = client.open_download(url).await?;
    let partial = path.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial).await?;
    let mut got = 0u64;
    while let Some(chunk) =
        response.chunk().await.map_err(|e| ClientError::Unreachable(e.to_string()))?
    {
        got += chunk.len() as u64;
        if got > want {
            break;
        }
        file.write_all(&chunk).await?;
    }
    if got != want {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(MirrorError::OutboardLength { got, want });
    }
    file.sync_all().await?;
    tokio::fs::rename(&partial, path).await?;
    Ok(())
}
