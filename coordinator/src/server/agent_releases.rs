//! Agent releases: publishing (the operator's; the manifest verified against the root of
//! trust, every file checked against it before it is stored), the newest release for a
//! platform (the launcher's frozen path), and the files, for appliances.
//!
//! `GET /api/agent-releases/latest?platform=P` answers with the signed manifest itself and
//! nothing else, so its format is the manifest's and never changes with this server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sitecast_manifest::{Blake3Hash, ImageInfo};

use super::auth::{Operator, SignedAppliance};
use super::{ApiError, AppState, RequestBody, change, lock, parse_json};
use crate::blobs::ImportError;
use crate::store::AgentReleaseRecord;

#[derive(Deserialize)]
struct PublishRequest {
    manifest: String,
    /// Per platform, a directory on this server laid out as the build is installed; its files
    /// are copied in, so the directory may change later.
    builds: BTreeMap<String, PathBuf>,
}

pub(super) async fn publish(
    State(state): State<Arc<AppState>>,
    _: Operator,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let root = super::releases::root_of_trust(&state)?;
    let request: PublishRequest = parse_json(&body)?;
    let verified =
        root.verify_agent_release(request.manifest.as_bytes(), state.clock.now()).map_err(|e| {
            ApiError::bad_request("manifest_rejected", format!("manifest rejected: {e}"))
        })?;
    let release = verified.release().clone();
    if lock(&state.fleet).agent_releases.contains_key(&release.version) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("agent release {} is already published", release.version),
        ));
    }
    // Every file is checked before any record says the release exists; files are
    // content-addressed, so one already stored (an earlier release's) is simply kept.
    let mut imports = Vec::new();
    for build in &release.builds {
        let dir = request.builds.get(&build.platform).ok_or_else(|| {
            ApiError::bad_request(
                "missing_build",
                format!("no directory given for platform {:?}", build.platform),
            )
        })?;
        for file in &build.files {
            let info = ImageInfo { size: file.size, blake3: file.blake3, sha256: file.sha256 };
            imports.push((dir.join(&file.path), info, file.path.clone()));
        }
    }
    let blobs = state.blobs.clone();
    tokio::task::spawn_blocking(move || {
        for (source, info, name) in imports {
            blobs.import_path(&source, &info).map_err(|e| match e {
                ImportError::Mismatch(e) => ApiError::bad_request(
                    "file_mismatch",
                    format!("{name} does not match the manifest: {e}"),
                ),
                ImportError::Io(e) => {
                    ApiError::bad_request("file_unreadable", format!("{}: {e}", source.display()))
                }
                // Agent files have no content index.
                e @ (ImportError::IndexMismatch { .. } | ImportError::IndexChunks { .. }) => {
                    ApiError::internal(e)
                }
            })?;
        }
        Ok::<_, ApiError>(())
    })
    .await
    .map_err(ApiError::internal)??;
    let record = AgentReleaseRecord {
        version: release.version,
        version_name: release.version_name.clone(),
        published: state.clock.now(),
        platforms: release.builds.iter().map(|b| b.platform.clone()).collect(),
        files: release
            .builds
            .iter()
            .flat_map(|b| b.files.iter().map(|f| f.blake3.to_hex()))
            .collect(),
        os_min: release.os_releases.min,
        os_max: release.os_releases.max,
        expires: release.expires,
        manifest: String::from_utf8_lossy(&verified.to_bytes()).into_owned(),
    };
    let shown = record.clone();
    change(&state, move |fleet, now| fleet.publish_agent(record.clone(), now)).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Json<Vec<AgentReleaseRecord>> {
    Json(lock(&state.fleet).agent_releases.values().cloned().collect())
}

#[derive(Deserialize)]
pub(super) struct LatestQuery {
    platform: String,
    /// The OS release the appliance runs.
    os_release: Option<u64>,
    /// Only versions above this one (the agent version the appliance has).
    above: Option<u64>,
}

/// The newest agent release an appliance can take (see [`crate::fleet::Fleet::latest_agent`]):
/// its signed manifest, byte for byte. Public, like release manifests: it says what a build
/// is, and the launcher verifies it against its root.
pub(super) async fn latest(
    State(state): State<Arc<AppState>>,
    Query(query): Query<LatestQuery>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let manifest = lock(&state.fleet)
        .latest_agent(&query.platform, query.os_release, query.above, now)
        .map(|r| r.manifest.clone())
        .ok_or_else(|| ApiError::not_found(format!("agent release for {}", query.platform)))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], manifest).into_response())
}

/// A file of a published agent release, by BLAKE3, for an enrolled appliance.
pub(super) async fn file(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    _: SignedAppliance,
) -> Result<Response, ApiError> {
    let blake3 = Blake3Hash::from_hex(&hash)
        .map_err(|e| ApiError::bad_request("bad_hash", format!("{hash}: {e}")))?;
    if !lock(&state.fleet).is_agent_file(&blake3.to_hex()) {
        return Err(ApiError::not_found(format!("agent file {hash}")));
    }
    let file = tokio::fs::File::open(state.blobs.data_path(&blake3))
        .await
        .map_err(ApiError::stored_file)?;
    let length = file.metadata().await.map_err(ApiError::internal)?.len();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
