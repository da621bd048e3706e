//! Publishing, listing and deactivating releases. Publishing is the operator's; the manifest is
//! verified against the root of trust before the image is read, and the image is checked
//! against the manifest before it is stored.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sitecast_manifest::{Blake3Hash, ContentIndex, ImageDigest, ImageInfo, TrustedRoot};
use tokio::io::AsyncWriteExt;

use super::auth::Operator;
use super::{ApiError, AppState, MAX_JSON_BYTES, change, lock, parse_json};
use crate::blobs::{BlobInfo, BlobStore, ImportError};
use crate::store::{PlanFile, ReleaseRecord, StoredFile};

/// Manifests are a few KiB; this leaves room for many signatures and long notes.
const MAX_MANIFEST_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
struct PublishPath {
    manifest: String,
    image_path: PathBuf,
}

pub(super) async fn publish(
    State(state): State<Arc<AppState>>,
    _: Operator,
    request: Request,
) -> Result<Response, ApiError> {
    let root = root_of_trust(&state)?;
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (verified, incoming) = if is_multipart {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("malformed_upload", e.to_string()))?;
        receive_upload(&state, &root, multipart).await?
    } else {
        let body =
            axum::body::to_bytes(request.into_body(), MAX_JSON_BYTES).await.map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            })?;
        let request: PublishPath = parse_json(&body)?;
        let verified = verify_manifest(&state, &root, request.manifest.as_bytes())?;
        (verified, Err(request.image_path))
    };
    let image = verified.release().image.clone();
    let blobs = state.blobs.clone();
    let import_image = image.clone();
    let index = verified.release().index.clone();
    let index_hash = index.as_ref().map(|index| index.blake3.to_hex());
    let plan_from = match index.is_some() {
        true => plans_from(&lock(&state.fleet).releases, &image),
        false => Vec::new(),
    };
    let (outboard, group_hashes, plans) = tokio::task::spawn_blocking(move || {
        match incoming {
            Ok(path) => blobs.import(&path, &import_image),
            Err(source) => blobs.import_path(&source, &import_image),
        }?;
        if let Some(index) = &index {
            blobs.make_index(&import_image, index)?;
        }
        let outboard = blobs.outboard_as_blob(&import_image)?;
        let group_hashes = blobs.group_hashes_as_blob(&import_image)?;
        let plans = match (&index, group_hashes.size) {
            (Some(index), 1..) => {
                make_plans(&blobs, plan_from, &import_image, index, &group_hashes)
            }
            _ => Vec::new(),
        };
        Ok((outboard, group_hashes, plans))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| match e {
        ImportError::Mismatch(e) => ApiError::bad_request(
            "image_mismatch",
            format!("image does not match the manifest: {e}"),
        ),
        ImportError::IndexMismatch { .. } | ImportError::IndexChunks { .. } => {
            ApiError::bad_request("index_mismatch", e.to_string())
        }
        ImportError::Io(e) => ApiError::bad_request("image_unreadable", format!("image: {e}")),
    })?;
    let release = verified.release();
    let record = ReleaseRecord {
        version: release.version,
        version_name: release.version_name.clone(),
        notes: release.notes.clone(),
        created: release.created,
        published: state.clock.now(),
        active: true,
        blake3: image.blake3.to_hex(),
        sha256: image.sha256.to_hex(),
        size: image.size,
        platforms: release.platforms.clone(),
        rollback_floor: release.rollback_floor,
        manifest: String::from_utf8_lossy(&verified.to_bytes()).into_owned(),
        swu: None,
        mirrors: Vec::new(),
        index: index_hash,
        // An image of one group has no parents: nothing to share.
        outboard: StoredFile::unless_empty(&outboard),
        group_hashes: StoredFile::unless_empty(&group_hashes),
        plans,
    };
    if let Some(iroh) = state.iroh.get() {
        iroh.add(&state.blobs.data_path(&image.blake3)).await.map_err(ApiError::internal)?;
    }
    let shown = record.clone();
    change(&state, move |fleet, now| fleet.publish(record.clone(), now)).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

/// Plans are made at publish from this many of the newest other releases with a content
/// index: an appliance on an older one updates with the index and group hashes instead.
const MAX_PLANS: usize = 8;

/// The releases to plan updates to `image` from: the newest others with an image and a
/// content index (older ones as a rule; a newer one for rollbacks), with their image and
/// index.
fn plans_from(
    releases: &std::collections::BTreeMap<u64, ReleaseRecord>,
    image: &ImageInfo,
) -> Vec<(BlobInfo, Blake3Hash)> {
    let others =
        releases.values().rev().filter(|r| r.has_image() && r.blake3 != image.blake3.to_hex());
    let planned = others.filter_map(|r| {
        let blake3 = Blake3Hash::from_hex(&r.blake3).ok()?;
        let index = Blake3Hash::from_hex(r.index.as_deref()?).ok()?;
        Some((BlobInfo { blake3, size: r.size }, index))
    });
    let mut seen = std::collections::BTreeSet::new();
    planned.filter(|(from, _)| seen.insert(from.blake3)).take(MAX_PLANS).collect()
}

/// A plan to `image` from each of `from`, stored; one that cannot be made is left out (the
/// appliances on that release update with the index), with a warning. Blocking.
fn make_plans(
    blobs: &BlobStore,
    from: Vec<(BlobInfo, Blake3Hash)>,
    image: &ImageInfo,
    index: &ContentIndex,
    group_hashes: &ImageDigest,
) -> Vec<PlanFile> {
    from.into_iter()
        .filter_map(|(older, older_index)| {
            let made =
                blobs.plan_as_blob(older, &older_index, image, &index.blake3, &group_hashes.blake3);
            match made {
                Ok(plan) => Some(PlanFile {
                    from: older.blake3.to_hex(),
                    file: StoredFile::unless_empty(&plan)?,
                }),
                Err(error) => {
                    tracing::warn!(from = %older.blake3, %error, "no plan for updates from this image");
                    None
                }
            }
        })
        .collect()
}

/// The root of trust published manifests must verify against; without one, publishing of
/// any kind is refused.
pub(super) fn root_of_trust(state: &AppState) -> Result<TrustedRoot, ApiError> {
    state.root.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_root",
            "this coordinator has no root of trust configured (--root)",
        )
    })
}

fn verify_manifest(
    state: &AppState,
    root: &TrustedRoot,
    bytes: &[u8],
) -> Result<sitecast_manifest::VerifiedRelease, ApiError> {
    let verified = root.verify_release(bytes, state.clock.now()).map_err(|e| {
        ApiError::bad_request("manifest_rejected", format!("manifest rejected: {e}"))
    })?;
    let version = verified.release().version;
    if lock(&state.fleet).releases.contains_key(&version) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("release {version} is already published"),
        ));
    }
    Ok(verified)
}

/// Reads a multipart upload: `manifest` first (cut off past [`MAX_MANIFEST_BYTES`]), then
/// `image`, streamed to disk and cut off one byte past the size the manifest declares.
async fn receive_upload(
    state: &AppState,
    root: &TrustedRoot,
    mut multipart: Multipart,
) -> Result<(sitecast_manifest::VerifiedRelease, Result<PathBuf, PathBuf>), ApiError> {
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request("malformed_upload", format!("upload: {e}"))
    };
    let mut verified = None;
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("manifest") => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    if bytes.len() + chunk.len() > MAX_MANIFEST_BYTES {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            format!("the manifest field is larger than {MAX_MANIFEST_BYTES} bytes"),
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                verified = Some(verify_manifest(state, root, &bytes)?);
            }
            Some("image") => {
                let verified = verified.ok_or_else(|| {
                    ApiError::bad_request(
                        "malformed_upload",
                        "send the manifest field before the image",
                    )
                })?;
                let declared = verified.release().image.size;
                let path = state.blobs.incoming_path();
                let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
                let mut received = 0u64;
                let outcome: Result<(), ApiError> = async {
                    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                        received += chunk.len() as u64;
                        if received > declared {
                            return Err(ApiError::bad_request(
                                "image_mismatch",
                                format!("image is larger than the {declared} bytes the manifest declares"),
                            ));
                        }
                        file.write_all(&chunk).await.map_err(ApiError::internal)?;
                    }
                    file.sync_all().await.map_err(ApiError::internal)
                }
                .await;
                if let Err(error) = outcome {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(error);
                }
                return Ok((verified, Ok(path)));
            }
            _ => {}
        }
    }
    Err(ApiError::bad_request(
        "malformed_upload",
        "the upload needs a `manifest` and an `image` field",
    ))
}

pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Json<Vec<ReleaseRecord>> {
    Json(lock(&state.fleet).releases.values().cloned().collect())
}

pub(super) async fn deactivate(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(version): Path<u64>,
) -> Result<StatusCode, ApiError> {
    change(&state, move |fleet, now| fleet.deactivate(version, now)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed manifest: public, like a package index (it says what an image is, not what is in
/// it), so anyone can verify an image they hold.
pub(super) async fn manifest(
    State(state): State<Arc<AppState>>,
    Path(version): Path<u64>,
) -> Result<Response, ApiError> {
    let record = lock(&state.fleet)
        .releases
        .get(&version)
        .cloned()
        .filter(ReleaseRecord::has_image)
        .ok_or_else(|| ApiError::not_found(format!("a sitecast image of release {version}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], record.manifest).into_response())
}

#[derive(Deserialize)]
pub(super) struct SwuQuery {
    /// The release's name when the artifact is published alone (no such release yet).
    name: Option<String>,
}

/// `PUT /api/releases/{version}/swu/{filename}`: a SWUpdate artifact for the release's DDI
/// devices (or, with no such release, a release of its own), streamed to disk and hashed as it arrives (BLAKE3 to store it, SHA-256, SHA-1 and
/// MD5 for the clients). It is signed with the operator's SWUpdate key, which the device
/// checks: Central Command cannot, and serves it only to devices offered this release.
pub(super) async fn publish_swu(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path((version, filename)): Path<(u64, String)>,
    Query(query): Query<SwuQuery>,
    request: Request,
) -> Result<(StatusCode, Json<ReleaseRecord>), ApiError> {
    use futures_util::StreamExt;
    use sha1::Digest;

    crate::fleet::check_swu_filename(&filename)?;
    lock(&state.fleet).swu_publishable(version)?;
    let path = state.blobs.incoming_path();
    let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
    let (mut blake3, mut sha256) = (blake3::Hasher::new(), sha2::Sha256::new());
    let (mut sha1, mut md5) = (sha1::Sha1::new(), md5::Md5::new());
    let mut size = 0u64;
    let mut body = request.into_body().into_data_stream();
    let received: Result<(), ApiError> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            })?;
            size += chunk.len() as u64;
            blake3.update(&chunk);
            sha256.update(&chunk);
            sha1.update(&chunk);
            md5.update(&chunk);
            file.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        file.sync_all().await.map_err(ApiError::internal)
    }
    .await;
    let received = received.and_then(|()| {
        if size == 0 {
            return Err(ApiError::bad_request("invalid", "the .swu is empty"));
        }
        Ok(())
    });
    if let Err(error) = received {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(error);
    }
    let info = sitecast_manifest::ImageInfo {
        size,
        blake3: blake3.finalize().into(),
        sha256: sitecast_manifest::Sha256Hash(sha256.finalize().into()),
    };
    let swu = crate::store::SwuArtifact {
        filename,
        size,
        blake3: info.blake3.to_hex(),
        sha256: info.sha256.to_hex(),
        sha1: hex::encode(sha1.finalize()),
        md5: hex::encode(md5.finalize()),
    };
    let blobs = state.blobs.clone();
    tokio::task::spawn_blocking(move || blobs.import(&path, &info))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(format!("storing the artifact: {e:?}")))?;
    let record = super::mutate(
        &state,
        move |fleet, now| {
            Ok(((), fleet.publish_swu(version, swu.clone(), query.name.clone(), now)?))
        },
        move |fleet, (), _| fleet.releases.get(&version).cloned(),
    )
    .await?
    .ok_or_else(|| ApiError::not_found(format!("release {version}")))?;
    Ok((StatusCode::CREATED, Json(record)))
}
