//! A release's mirrors: plain HTTP origins of its image (a CDN, an object store, nginx).
//!
//! A run of pieces is asked for by `Range`, one request per stretch of adjacent groups, and
//! read piece by piece. Each piece's bytes are encoded against the image's outboard (fetched
//! once from Central Command; its top pair checked against the signed root) and go through
//! the same decoder as every other response, so a mirror needs no trust: a byte it changes
//! fails its group, and nothing of that group is written. A mirror that fails, stalls or lies
//! is not asked again by this download; Central Command's verified ranges stay the fallback.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use sitecast_iso::{BlobLayout, FileDevice, GROUP_BYTES, OutboardStore};

use crate::coordinator::CoordinatorClient;
use crate::outboard::{self, OutboardError};
use crate::swarm::FetchError;

/// A mirror that sends nothing for this long is given up for this download: well inside the
/// scheduler's request timeout, so the mirror is dropped before its run is.
pub const MIRROR_IDLE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Outboard(#[from] OutboardError),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// The mirrors of one download, in the order they are tried.
pub struct Mirrors {
    http: reqwest::Client,
    urls: Vec<String>,
    given_up: Mutex<Vec<bool>>,
    outboard: OutboardStore<FileDevice>,
    idle: Duration,
}

impl std::fmt::Debug for Mirrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| shown(u)).collect();
        f.debug_struct("Mirrors").field("urls", &urls).finish_non_exhaustive()
    }
}

/// `url` for logs and errors: scheme, host and path, never a signed URL's query or
/// credentials.
pub fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
            let host = parsed.host_str().unwrap_or("");
            format!("{}://{host}{port}{}", parsed.scheme(), parsed.path())
        }
        Err(_) => "(not a URL)".into(),
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
        let outboard = outboard::fetch(client, outboard_url, layout, &path).await?;
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        let http = match sitecast_tls::client_config(&sitecast_tls::Trust::SystemRoots) {
            Ok(tls) => http.tls_backend_preconfigured(tls),
            // No trust store here: plain-HTTP mirrors still work, https ones fail over.
            Err(_) => http,
        };
        let http = http.build().map_err(|e| MirrorError::Client(e.to_string()))?;
        let given_up = Mutex::new(vec![false; urls.len()]);
        Ok(Self { http, urls, given_up, outboard, idle: MIRROR_IDLE })
    }

    /// Gives a mirror up after `idle` without a byte instead of [`MIRROR_IDLE`].
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The first mirror not given up.
    pub(crate) fn current(&self) -> Option<usize> {
        self.given_up.lock().unwrap_or_else(|p| p.into_inner()).iter().position(|gone| !gone)
    }

    /// Gives mirror `index` up for this download; whether it was still in use (runs that
    /// failed on it at the same time give it up once).
    pub(crate) fn give_up(&self, index: usize, error: &FetchError) -> bool {
        let was_in_use = {
            let mut given_up = self.given_up.lock().unwrap_or_else(|p| p.into_inner());
            !std::mem::replace(&mut given_up[index], true)
        };
        if was_in_use {
            let url = shown(&self.urls[index]);
            match error {
                FetchError::Corrupt(reason) => {
                    tracing::warn!(%url, %reason, "a mirror sent bytes that do not verify; not asked again")
                }
                FetchError::Failed(reason) => {
                    tracing::warn!(%url, %reason, "a mirror failed; not asked again")
                }
                FetchError::Busy => tracing::warn!(%url, "a mirror was busy; not asked again"),
            }
        }
        was_in_use
    }

    /// Asks mirror `index` for `groups` (adjacent groups of the image); the answer is read
    /// with [`RangeBody::take`].
    pub(crate) async fn open(
        &self,
        index: usize,
        layout: BlobLayout,
        groups: Range<u64>,
    ) -> Result<RangeBody, FetchError> {
        let bytes = groups.start * GROUP_BYTES..(groups.end * GROUP_BYTES).min(layout.size);
        let failed = |why: String| FetchError::Failed(why);
        let header = format!("bytes={}-{}", bytes.start, bytes.end - 1);
        let request = self.http.get(&self.urls[index]).header(reqwest::header::RANGE, header);
        let response = tokio::time::timeout(self.idle, request.send())
            .await
            .map_err(|_| failed(format!("no answer for {:?}", self.idle)))?
            .map_err(|e| failed(format!("unreachable: {}", e.without_url())))?;
        let status = response.status();
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            // A 200 would be the whole image: not read.
            return Err(failed(format!("answered {status} to a Range request")));
        }
        let expected = format!("bytes {}-{}/{}", bytes.start, bytes.end - 1, layout.size);
        let content_range = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if content_range != expected {
            return Err(failed(format!("Content-Range {content_range:?}, not {expected:?}")));
        }
        Ok(RangeBody { response, pending: Bytes::new(), idle: self.idle })
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

/// A mirror's answer to one `Range` request, read a piece at a time.
pub(crate) struct RangeBody {
    response: reqwest::Response,
    pending: Bytes,
    idle: Duration,
}

impl RangeBody {
    /// The next `n` bytes of the answer.
    pub(crate) async fn take(&mut self, n: usize) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pending.is_empty() {
                let chunk = tokio::time::timeout(self.idle, self.response.chunk())
                    .await
                    .map_err(|_| FetchError::Failed(format!("nothing sent for {:?}", self.idle)))?
                    .map_err(|e| FetchError::Failed(format!("cut off: {}", e.without_url())))?;
                match chunk {
                    Some(chunk) => self.pending = chunk,
                    None => return Err(FetchError::Failed("the answer ended early".into())),
                }
            }
            let k = (n - out.len()).min(self.pending.len());
            out.extend_from_slice(&self.pending.split_to(k));
        }
        Ok(out)
    }
}
