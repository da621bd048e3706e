//! A release's mirrors: other HTTP origins of its image (a CDN, an object store, nginx) that
//! appliances fetch plain byte ranges from before Central Command. Appliances verify every
//! group against the outboard and the signed root, so a mirror needs no trust; it is checked
//! here all the same, so an operator learns of a wrong URL when naming it, not from a site
//! that quietly fetched everything from Central Command.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use sitecast_iso::GROUP_BYTES;
use sitecast_manifest::api::ReleaseMirrors;

use super::auth::Operator;
use super::{ApiError, AppState, RequestBody, change, lock, parse_json};

/// How long a mirror has to answer one check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// `PUT /api/releases/{version}/mirrors`.
pub(super) async fn set(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(version): Path<u64>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    let ReleaseMirrors { mirrors } = parse_json(&body)?;
    let record = lock(&state.fleet).mirrorable(version, &mirrors)?.clone();
    if !mirrors.is_empty() {
        let blake3 =
            sitecast_manifest::Blake3Hash::from_hex(&record.blake3).map_err(ApiError::internal)?;
        let image = state.blobs.data_path(&blake3);
        let client = check_client()?;
        for url in &mirrors {
            check(&client, url, &image, record.size).await.map_err(|why| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "mirror_check_failed",
                    format!("mirror {url:?} does not serve release {version}'s image: {why}"),
                )
            })?;
        }
    }
    change(&state, move |fleet, now| fleet.set_mirrors(version, mirrors.clone(), now)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn check_client() -> Result<reqwest::Client, ApiError> {
    let builder = reqwest::Client::builder().timeout(CHECK_TIMEOUT).redirect(
        // A CDN or object store may redirect; appliances follow redirects too.
        reqwest::redirect::Policy::limited(5),
    );
    let builder = match sitecast_tls::client_config(&sitecast_tls::Trust::SystemRoots) {
        Ok(tls) => builder.tls_backend_preconfigured(tls),
        // Without a trust store only plain-HTTP mirrors can be checked; an https one fails
        // its check with the reason.
        Err(_) => builder,
    };
    builder.build().map_err(ApiError::internal)
}

/// Asks `url` for the image's first and last groups by `Range` and compares them with the
/// stored image.
async fn check(
    client: &reqwest::Client,
    url: &str,
    image: &std::path::Path,
    size: u64,
) -> Result<(), String> {
    let first = 0..size.min(GROUP_BYTES);
    let last = size.saturating_sub(GROUP_BYTES)..size;
    for range in [first, last] {
        let served = ranged_get(client, url, range.clone(), size).await?;
        let stored = read_at(image, range.clone()).await.map_err(|e| e.to_string())?;
        if served != stored {
            return Err(format!(
                "bytes {}..{} differ from the release's image (another file or version?)",
                range.start, range.end
            ));
        }
    }
    Ok(())
}

/// `GET url` for `range` of a `size`-byte file: the answer must be that range.
async fn ranged_get(
    client: &reqwest::Client,
    url: &str,
    range: Range<u64>,
    size: u64,
) -> Result<Vec<u8>, String> {
    let header = format!("bytes={}-{}", range.start, range.end - 1);
    let mut response = client
        .get(url)
        .header(reqwest::header::RANGE, header)
        .send()
        .await
        .map_err(|e| format!("unreachable: {}", crate::error_chain(&e.without_url())))?;
    let status = response.status();
    if status != StatusCode::PARTIAL_CONTENT {
        return Err(format!("answered {status} to a Range request (206 expected)"));
    }
    let content_range = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let expected = format!("bytes {}-{}/{size}", range.start, range.end - 1);
    if content_range != expected {
        return Err(format!(
            "Content-Range {content_range:?}, not {expected:?} (a file of another size?)"
        ));
    }
    let want = (range.end - range.start) as usize;
    let mut body = Vec::with_capacity(want);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("cut off: {}", crate::error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > want {
            return Err("sent more than the range asked for".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn read_at(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(range.start)).await?;
    let mut bytes = vec![0; (range.end - range.start) as usize];
    file.read_exact(&mut bytes).await?;
    Ok(bytes)
}
