//! The origin: the plain image (legacy agents, humans, `curl`) and verified ranges (the
//! agent's WAN path). Only for the fleet: operators, enrolled appliances, and holders of an
//! image URL from an offer; never a deactivated release except to the operator.
//!
//! Encoding verified ranges is blocking work (file reads and hashing). It runs in at most
//! `max_range_streams` blocking tasks at once, at most `max_range_streams_per_client` of them
//! for one client address ([`super::range_pool`]), and a client that stops reading for
//! [`STALL_TIMEOUT`] loses its stream, so slow or hostile readers can never take the threads
//! that commit state, and one client cannot take every encoder from the rest of the fleet.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sitecast_manifest::ImageInfo;
use sitecast_manifest::api;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::auth::{ImageReader, peer_address};
use super::range_pool::Busy;
use super::{ApiError, AppState, lock};
use crate::blobs::BlobInfo;
use crate::fleet::Fleet;
use crate::range::{self, RangeDecision};
use crate::store::ReleaseRecord;
use crate::wire;
use sitecast_iso::{Device, FileDevice, OutboardStore};

/// A verified-range client that reads nothing for this long is dropped.
pub(super) const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a range request waits for a free encoder before it is told to come back.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

fn image_info(record: &ReleaseRecord) -> Result<ImageInfo, ApiError> {
    Ok(ImageInfo {
        size: record.size,
        blake3: sitecast_manifest::Blake3Hash::from_hex(&record.blake3)
            .map_err(ApiError::internal)?,
        sha256: sitecast_manifest::Sha256Hash::from_hex(&record.sha256)
            .map_err(ApiError::internal)?,
    })
}

/// The release, if this reader may have its bytes.
fn readable(
    state: &Arc<AppState>,
    reader: &ImageReader,
    find: impl FnOnce(&Fleet) -> Option<ReleaseRecord>,
    what: &str,
) -> Result<ReleaseRecord, ApiError> {
    let record = find(&lock(&state.fleet)).ok_or_else(|| ApiError::not_found(what))?;
    if !record.active && !matches!(reader, ImageReader::Operator) {
        return Err(ApiError::not_found(format!("{what} (deactivated)")));
    }
    Ok(record)
}

/// The plain image: `Range` and conditional requests as RFC 9110 has them, `ETag`, SHA-256 in
/// a header.
pub(super) async fn image(
    State(state): State<Arc<AppState>>,
    Path(version): Path<u64>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let reader = ImageReader::check(&state, &parts, Some(version))?;
    let record = readable(
        &state,
        &reader,
        |f| f.releases.get(&version).filter(|r| r.has_image()).cloned(),
        &format!("the image of release {version}"),
    )?;
    let mut response_headers = HeaderMap::new();
    let value = |s: &str| HeaderValue::from_str(s).map_err(ApiError::internal);
    response_headers.insert(api::HEADER_IMAGE_SHA256, value(&record.sha256)?);
    response_headers.insert(header::CONTENT_TYPE, value("application/octet-stream")?);
    let path = state.blobs.data_path(&image_info(&record)?.blake3);
    let etag = format!("\"{}\"", record.blake3);
    ranged_file(&parts.headers, &path, record.size, &etag, response_headers).await
}

/// A stored file of `size` bytes: `Range` and conditional requests as RFC 9110 has them,
/// under `etag`, with `response_headers` added.
pub(super) async fn ranged_file(
    headers: &HeaderMap,
    path: &std::path::Path,
    size: u64,
    etag: &str,
    mut response_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let value = |s: &str| HeaderValue::from_str(s).map_err(ApiError::internal);
    response_headers.insert(header::ETAG, value(etag)?);
    response_headers.insert(header::ACCEPT_RANGES, value("bytes")?);
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if range::not_modified(text(header::IF_NONE_MATCH), etag) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let (status, range) =
        match range::decide(text(header::RANGE), text(header::IF_RANGE), etag, size) {
            RangeDecision::Full => (StatusCode::OK, 0..size),
            RangeDecision::Partial(range) => {
                let content_range = format!("bytes {}-{}/{}", range.start, range.end - 1, size);
                response_headers.insert(header::CONTENT_RANGE, value(&content_range)?);
                (StatusCode::PARTIAL_CONTENT, range)
            }
            RangeDecision::NotSatisfiable => {
                response_headers.insert(header::CONTENT_RANGE, value(&format!("bytes */{size}"))?);
                return Ok((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
            }
        };
    let mut file = tokio::fs::File::open(path).await.map_err(ApiError::stored_file)?;
    file.seek(std::io::SeekFrom::Start(range.start)).await.map_err(ApiError::internal)?;
    let length = range.end - range.start;
    response_headers.insert(header::CONTENT_LENGTH, value(&length.to_string())?);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), 256 * 1024);
    Ok((status, response_headers, Body::from_stream(stream)).into_response())
}

/// `start` and `end` name one range of groups; `ranges` (`a-b,c-d,…`, ascending and
/// disjoint, at most [`sitecast_iso::MAX_RANGES_PER_RESPONSE`]) several, and wins when both
/// are given (an agent sends both, so a Central Command that knows only `start` and `end`
/// still serves the first range).
#[derive(Deserialize)]
pub(super) struct GroupRange {
    start: Option<u64>,
    end: Option<u64>,
    ranges: Option<String>,
}

impl GroupRange {
    /// The ranges asked for, checked against a blob of `groups` groups.
    fn parse(&self, groups: u64) -> Result<Vec<std::ops::Range<u64>>, ApiError> {
        let bad = |why: String| ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", why);
        let ranges = match (&self.ranges, self.start, self.end) {
            (Some(list), _, _) => {
                let mut ranges = Vec::new();
                // One past the limit is enough to refuse a list, however long it is.
                for item in list.split(',').take(sitecast_iso::MAX_RANGES_PER_RESPONSE + 1) {
                    let parsed = item.split_once('-').and_then(|(start, end)| {
                        Some(start.parse::<u64>().ok()?..end.parse::<u64>().ok()?)
                    });
                    ranges.push(parsed.ok_or_else(|| bad(format!("{item:?} is not a range a-b")))?);
                }
                ranges
            }
            (None, Some(start), Some(end)) => std::iter::once(start..end).collect(),
            (None, _, _) => return Err(bad("name groups with start and end, or ranges".into())),
        };
        if ranges.len() > sitecast_iso::MAX_RANGES_PER_RESPONSE {
            return Err(bad(format!(
                "{} ranges; at most {} in one request",
                ranges.len(),
                sitecast_iso::MAX_RANGES_PER_RESPONSE
            )));
        }
        let mut floor = 0;
        for range in &ranges {
            if range.start < floor || range.start >= range.end || range.end > groups {
                return Err(bad(format!(
                    "groups {}..{} are not within 0..{groups}, ascending and disjoint",
                    range.start, range.end
                )));
            }
            floor = range.end;
        }
        Ok(ranges)
    }
}

/// Verified ranges: `[size u64 LE][bao encoding of the groups]`, what iroh-blobs sends for a
/// ranged get, so appliances check origin data exactly like LAN data.
pub(super) async fn blob_ranges(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    Query(range): Query<GroupRange>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let (info, reader, version) = ranged_blob(&state, &parts, &hash).await?;
    let layout = sitecast_iso::BlobLayout::new(info.blake3, info.size);
    let groups = range.parse(layout.groups())?;
    let length = layout.encoded_len_of(&groups);
    let encode =
        move |data: &FileDevice, outboard: &OutboardStore<FileDevice>, out: &mut dyn Write| {
            outboard.encode_runs(data, &groups, out)
        };
    let encoding = Encoding::Asked;
    let mut response =
        stream_blob(&state, &parts, info, &reader, version, (length, encoding), encode).await?;
    let headers = response.headers_mut();
    headers.insert(sitecast_manifest::api::HEADER_RUNS, HeaderValue::from_static("1"));
    Ok(response)
}

/// `ranges=A-B,C-D,…`: byte ranges of a blob (`B` exclusive), ascending and disjoint, at
/// most [`MAX_BYTE_RANGES`]. With `from` (the BLAKE3 of an older release's image, the one
/// the appliance runs) and `reference=A-B` (bytes of that image), the answer may be
/// compressed against those bytes ([`Reference`]).
#[derive(Deserialize)]
pub(super) struct ByteRanges {
    ranges: Option<String>,
    from: Option<String>,
    reference: Option<String>,
}

/// The most byte ranges in one request: a piece's missing parts, merged, are far fewer.
pub(super) const MAX_BYTE_RANGES: usize = 256;

fn bad_range(why: String) -> ApiError {
    ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", why)
}

impl ByteRanges {
    fn parse(&self, size: u64) -> Result<Vec<std::ops::Range<u64>>, ApiError> {
        let bad = bad_range;
        let list = self
            .ranges
            .as_deref()
            .ok_or_else(|| bad("name byte ranges with ranges=A-B,…".into()))?;
        let mut ranges = Vec::new();
        let mut floor = 0;
        // One past the limit is enough to refuse a list, however long it is.
        for item in list.split(',').take(MAX_BYTE_RANGES + 1) {
            let parsed = item.split_once('-').and_then(|(start, end)| {
                Some(start.parse::<u64>().ok()?..end.parse::<u64>().ok()?)
            });
            let range = parsed.ok_or_else(|| bad(format!("{item:?} is not a range a-b")))?;
            if range.start < floor || range.start >= range.end || range.end > size {
                return Err(bad(format!(
                    "bytes {}..{} are not within 0..{size}, ascending and disjoint",
                    range.start, range.end
                )));
            }
            floor = range.end;
            ranges.push(range);
        }
        if ranges.len() > MAX_BYTE_RANGES {
            return Err(bad(format!("more than {MAX_BYTE_RANGES} ranges in one request")));
        }
        Ok(ranges)
    }
}

/// Bytes of an older release's image that an answer is compressed against: the appliance
/// holds them in its active slot, so what it lacks of a new image, mostly changed versions
/// of nearby old bytes, crosses the WAN about as small as a binary patch (docs/delta.md).
struct Reference {
    /// Where the older image is stored.
    path: std::path::PathBuf,
    bytes: std::ops::Range<u64>,
    /// Held while the answer is compressed.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The longest reference served: with up to 1 MiB asked for, it fits the 8 MiB window an
/// appliance decodes with.
use sitecast_delta::reference::MAX_REFERENCE;
/// zstd's window for answers with a reference: reference and answer within it.
const REFERENCE_WINDOW_LOG: u32 = 23;
/// Level for answers with a reference: finding short strings in the reference is what makes
/// them small (level 3 left a sixth more on the real pair; docs/delta.md).
const REFERENCE_LEVEL: i32 = 9;
/// At most this many answers are compressed against a reference at once (each holds its
/// reference and zstd's tables, tens of MiB); beyond them answers go without one.
pub(super) const REFERENCE_STREAMS: usize = 8;

impl Reference {
    /// The reference's bytes (blocking: for the encoding task).
    fn read(&self) -> std::io::Result<Vec<u8>> {
        let older = FileDevice::open_read_only(&self.path)?;
        let mut prefix = vec![0; (self.bytes.end - self.bytes.start) as usize];
        older.read_exact_at(self.bytes.start, &mut prefix)?;
        Ok(prefix)
    }
}

impl ByteRanges {
    /// The reference asked for, if it can be used: the older image is a release's this reader
    /// may read, stored here, and a compressor is free. A reference the server cannot use is
    /// not an error (the answer says whether it used one); one that is not `A-B` within the
    /// older image is.
    fn reference(
        &self,
        state: &Arc<AppState>,
        reader: &ImageReader,
        accepts_zstd: bool,
    ) -> Result<Option<Reference>, ApiError> {
        let (Some(from), Some(bytes)) = (&self.from, &self.reference) else {
            return Ok(None);
        };
        let bytes = bytes
            .split_once('-')
            .and_then(|(a, b)| Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?))
            .ok_or_else(|| bad_range(format!("reference {bytes:?} is not a range A-B")))?;
        let older = match reader {
            ImageReader::SignedUrl => None,
            _ => lock(&state.fleet)
                .release_by_hash(from)
                .filter(|r| r.active || matches!(reader, ImageReader::Operator))
                .cloned(),
        };
        let Some(older) = older else {
            return Ok(None);
        };
        if bytes.start >= bytes.end || bytes.end > older.size {
            return Err(bad_range(format!(
                "reference {}..{} is not within the {} bytes of {from}",
                bytes.start, bytes.end, older.size
            )));
        }
        if bytes.end - bytes.start > MAX_REFERENCE || !accepts_zstd {
            return Ok(None);
        }
        let Ok(permit) = Arc::clone(&state.reference_streams).try_acquire_owned() else {
            return Ok(None);
        };
        let path = state.blobs.data_path(&image_info(&older)?.blake3);
        Ok(Some(Reference { path, bytes, _permit: permit }))
    }
}

/// Plain bytes of a blob, the ranges asked for one after the other: what an appliance lacks
/// of groups it copied in part from its active slot, or of any piece when it names a
/// reference. Not checked on the way out (the appliance checks each group against the
/// outboard once it is whole); the same access, counting, limits and compression as
/// verified ranges.
pub(super) async fn blob_bytes(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    Query(asked): Query<ByteRanges>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let (info, reader, version) = ranged_blob(&state, &parts, &hash).await?;
    let ranges = asked.parse(info.size)?;
    let accepts = parts.headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok());
    let reference = asked.reference(&state, &reader, wire::accepts_zstd(accepts))?;
    let length = ranges.iter().map(|r| r.end - r.start).sum();
    let encode = move |data: &FileDevice, _: &OutboardStore<FileDevice>, out: &mut dyn Write| {
        let mut buffer = vec![0; 256 * 1024];
        for range in &ranges {
            let mut at = range.start;
            while at < range.end {
                let n = (range.end - at).min(buffer.len() as u64) as usize;
                data.read_exact_at(at, &mut buffer[..n])?;
                out.write_all(&buffer[..n])?;
                at += n as u64;
            }
        }
        Ok(())
    };
    let Some(reference) = reference else {
        return stream_blob(
            &state,
            &parts,
            info,
            &reader,
            version,
            (length, Encoding::Asked),
            encode,
        )
        .await;
    };
    let used = format!("{}-{}", reference.bytes.start, reference.bytes.end);
    let encoding = Encoding::Reference(reference);
    let mut response =
        stream_blob(&state, &parts, info, &reader, version, (length, encoding), encode).await?;
    let used = HeaderValue::from_str(&used).map_err(ApiError::internal)?;
    response.headers_mut().insert(api::HEADER_REFERENCE, used);
    Ok(response)
}

/// How [`stream_blob`] encodes an answer.
enum Encoding {
    /// zstd if the client accepts it and the blob compresses, else plain.
    Asked,
    /// zstd against a reference.
    Reference(Reference),
}

/// Streams what `encode` writes of a blob (`length` bytes before compression) from a blocking
/// task, with a stream of the range pool's ([`super::range_pool`]); compressed against a
/// reference, or when the client asks and the blob compresses ([`wire`]); counted, as sent, with the origin bytes of
/// the reader's site when the blob belongs to release `version`.
async fn stream_blob(
    state: &Arc<AppState>,
    parts: &axum::http::request::Parts,
    info: BlobInfo,
    reader: &ImageReader,
    version: Option<u64>,
    (length, encoding): (u64, Encoding),
    encode: impl FnOnce(&FileDevice, &OutboardStore<FileDevice>, &mut dyn Write) -> std::io::Result<()>
    + Send
    + 'static,
) -> Result<Response, ApiError> {
    let site = reader_site(reader);
    let permit = state.range_pool.acquire(peer_address(parts), QUEUE_TIMEOUT).await.map_err(
        |busy| match busy {
            Busy::ClientShare => ApiError::busy(
                "busy",
                "this address already holds its share of the verified-range streams; try again shortly",
                1,
            ),
            Busy::Pool => {
                ApiError::busy("busy", "every verified-range stream is taken; try again shortly", 1)
            }
        },
    )?;
    let accepts = parts.headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok());
    let reference = match encoding {
        Encoding::Reference(reference) => Some(reference),
        Encoding::Asked => None,
    };
    let compress = reference.is_some()
        || wire::accepts_zstd(accepts) && {
            let blobs = state.blobs.clone();
            tokio::task::spawn_blocking(move || blobs.compresses(&info))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::stored_file)?
        };
    let (data, outboard) = state.blobs.open_blob(&info).map_err(ApiError::stored_file)?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let counter = Arc::clone(state);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut writer = ChannelWriter { sender, sent: 0, runtime, client_gone: false };
        let result = match (compress, reference) {
            (_, Some(reference)) => reference.read().and_then(|prefix| {
                zstd_onto(&mut writer, length, Some(&prefix), |out| encode(&data, &outboard, out))
            }),
            (true, None) => {
                zstd_onto(&mut writer, length, None, |out| encode(&data, &outboard, out))
            }
            (false, None) => encode(&data, &outboard, &mut writer),
        };
        let sent = writer.sent;
        if let Err(error) = result {
            // The body ends in an error (hyper aborts it), so the client sees a broken
            // response, never one that looks complete; a client that stopped reading is
            // dropped after the stall timeout as it would have been.
            tracing::warn!(%error, "serving a blob stopped");
            // A client that went away or stopped reading is not waited for a second time.
            if !writer.client_gone {
                let failed = writer.sender.send(Err(error));
                let _ = writer.runtime.block_on(tokio::time::timeout(STALL_TIMEOUT, failed));
            }
        }
        // Per site and release; an agent release's files are counted by the appliances'
        // reports instead.
        if let Some(version) = version {
            counter.count_origin_bytes(Fleet::count_origin_bytes(&site, version, sent));
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let mut response = Body::from_stream(stream).into_response();
    let response_headers = response.headers_mut();
    response_headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response_headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    match compress {
        true => response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd")),
        false => response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length)),
    };
    Ok(response)
}

/// Runs `encode` into one zstd stream onto `writer` ([`wire`]), against `reference` when
/// given, ended properly only when all of it was encoded: a stream cut short is a truncated
/// response to the client.
fn zstd_onto(
    writer: &mut ChannelWriter,
    length: u64,
    reference: Option<&[u8]>,
    encode: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use zstd::stream::write::Encoder;
    let mut encoder = match reference {
        None => Encoder::new(writer, wire::LEVEL)?,
        Some(prefix) => {
            let mut encoder = Encoder::with_ref_prefix(writer, REFERENCE_LEVEL, prefix)?;
            encoder.set_parameter(zstd::zstd_safe::CParameter::WindowLog(REFERENCE_WINDOW_LOG))?;
            encoder
        }
    };
    // The frame says how long it is and carries a checksum, so a decoder tells a stream cut
    // short from a complete one; a known size also lets zstd use a smaller window.
    encoder.set_pledged_src_size(Some(length))?;
    encoder.include_checksum(true)?;
    encode(&mut encoder)?;
    encoder.finish().map(drop)
}

/// The outboard of a release's image (its tree's parent hashes, pre-order): what an
/// appliance checks a mirror's plain bytes against. For the readers of its verified ranges;
/// counted with the origin bytes of the reader's site.
pub(super) async fn blob_outboard(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let (info, reader, version) = ranged_blob(&state, &parts, &hash).await?;
    let Some(version) = version else {
        return Err(ApiError::not_found(format!("an image outboard {hash}")));
    };
    let layout = sitecast_iso::BlobLayout::new(info.blake3, info.size);
    let path = state.blobs.outboard_path(&info.blake3);
    let etag = format!("\"{}-outboard\"", info.blake3);
    let response =
        ranged_file(&parts.headers, &path, layout.outboard_len(), &etag, HeaderMap::new()).await?;
    count_sent(&state, &reader, version, &response);
    Ok(response)
}

/// Counts what `response` sends with the origin bytes of the reader's site (committing to
/// the store: not on the executor).
fn count_sent(state: &Arc<AppState>, reader: &ImageReader, version: u64, response: &Response) {
    let sent = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let (counter, site) = (Arc::clone(state), reader_site(reader));
    tokio::task::spawn_blocking(move || {
        counter.count_origin_bytes(Fleet::count_origin_bytes(&site, version, sent))
    });
}

/// The site whose origin bytes a reader's are.
fn reader_site(reader: &ImageReader) -> String {
    match reader {
        ImageReader::Appliance { site, .. } => site.clone(),
        _ => "unattributed".to_owned(),
    }
}

/// What `hash` names, if this reader may have verified ranges of it: a release's image,
/// content index or outboard (and that release, whose origin bytes are counted) or a file of
/// an agent release (enrolled appliances and operators only).
async fn ranged_blob(
    state: &Arc<AppState>,
    parts: &axum::http::request::Parts,
    hash: &str,
) -> Result<(BlobInfo, ImageReader, Option<u64>), ApiError> {
    let not_found = || ApiError::not_found(format!("blob {hash}"));
    let version = lock(&state.fleet).release_by_hash(hash).map(|r| r.version);
    if let Some(version) = version {
        let reader = ImageReader::check(state, parts, Some(version))?;
        let record = readable(
            state,
            &reader,
            |f| f.releases.get(&version).cloned(),
            &format!("blob {hash}"),
        )?;
        let info = image_info(&record)?;
        return Ok((BlobInfo { blake3: info.blake3, size: info.size }, reader, Some(version)));
    }
    let blake3 = sitecast_manifest::Blake3Hash::from_hex(hash).map_err(|_| not_found())?;
    // A release's content index, outboard or group hashes, counted with its release's bytes.
    let side_file_of = lock(&state.fleet).release_by_side_file(hash).map(|r| r.version);
    let reader = match side_file_of {
        Some(version) => {
            let reader = ImageReader::check(state, parts, Some(version))?;
            let what = format!("blob {hash}");
            readable(state, &reader, |f| f.releases.get(&version).cloned(), &what)?;
            reader
        }
        None if lock(&state.fleet).is_agent_file(&blake3.to_hex()) => {
            ImageReader::check(state, parts, None)?
        }
        None => return Err(not_found()),
    };
    // Checked against its manifest (or made) when it was stored: its length is its size.
    let size = tokio::fs::metadata(state.blobs.data_path(&blake3))
        .await
        .map_err(ApiError::stored_file)?
        .len();
    Ok((BlobInfo { blake3, size }, reader, side_file_of))
}

/// Bridges the synchronous encoder to the async body; a client that reads nothing for
/// [`STALL_TIMEOUT`] ends the stream.
struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    sent: u64,
    runtime: tokio::runtime::Handle,
    /// The client went away or stopped reading.
    client_gone: bool,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let chunk = Ok(Bytes::copy_from_slice(buf));
        let sent =
            self.runtime.block_on(tokio::time::timeout(STALL_TIMEOUT, self.sender.send(chunk)));
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.client_gone = true;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "client went away",
                ));
            }
            Err(_) => {
                self.client_gone = true;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
        }
        self.sent += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
