//! Talking to Central Command: signed check-ins and reports, and verified ranges from the
//! origin.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sitecast_manifest::SecretKey;
use sitecast_manifest::api::{self, CheckinRequest, CheckinResponse, ErrorBody, ReportRequest};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake failed on the server's certificate: expired, for another host, or
    /// from a CA this agent does not trust. Nothing was sent.
    #[error("refused the coordinator's TLS certificate: {0}")]
    Certificate(rustls::Error),
    /// The agent's own TLS settings cannot be used (e.g. `coordinator_ca` is unreadable):
    /// every request fails with this until the configuration is fixed.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// `code` is the stable [`ErrorBody::code`] (empty if the body was not one).
    #[error("coordinator refused the request ({status} {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("coordinator answered something this agent cannot read: {0}")]
    Unreadable(String),
}

impl ClientError {
    /// Whether the coordinator refused with this status and error code.
    pub fn is_refusal(&self, status: u16, code: &str) -> bool {
        matches!(self, Self::Refused { status: s, code: c, .. } if *s == status && c == code)
    }
}

/// `error` and every error behind it: reqwest's own message alone ("error sending request")
/// does not say what went wrong.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(error) = next {
        let more = error.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        next = error.source();
    }
    text
}

/// Fault injection for tests, named so: an agent that crashes on something Central Command
/// sends, as the fleet this replaces had (its agents crashed on a new attribute and could not
/// take the order that would fix them). Tests of the launcher's frozen path need such an
/// agent built from this code.
mod fault {
    /// `SITECAST_FAULT_CRASH_ON_ANSWER_FIELD=FIELD@RELEASE`: the agent running as agent
    /// release RELEASE aborts when a check-in answer carries the top-level field FIELD.
    const VARIABLE: &str = "SITECAST_FAULT_CRASH_ON_ANSWER_FIELD";

    pub(super) fn crash_on_answer(answer: &[u8], running: Option<u64>) {
        let Ok(setting) = std::env::var(VARIABLE) else { return };
        let Some((field, release)) = setting.split_once('@') else { return };
        if release.parse().ok() != running {
            return;
        }
        let carries = serde_json::from_slice::<serde_json::Value>(answer)
            .is_ok_and(|answer| answer.get(field).is_some_and(|v| !v.is_null()));
        if carries {
            eprintln!("{VARIABLE}: the check-in answer carries {field:?}; crashing as asked");
            std::process::abort();
        }
    }
}

/// The longest a single file download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The coordinator does not know this appliance (never enrolled, or removed by an operator).
pub const UNKNOWN_APPLIANCE: (u16, &str) = (403, "unknown_appliance");
/// A report whose sequence number is not above the last one the coordinator accepted.
pub const STALE_REPORT: (u16, &str) = (409, "stale_report");

/// A client signing every request with the appliance key.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    /// `Err`: why this agent's TLS settings are unusable; each request says so (the agent
    /// runs on, serving its site and showing the error, rather than refusing to start).
    http: Result<reqwest::Client, String>,
    base: String,
    key: SecretKey,
}

impl CoordinatorClient {
    /// A client for `base` that verifies `https://` servers against `ca_file` (pinned) or,
    /// without one, the system's roots.
    pub fn new(base: &str, ca_file: Option<&Path>, key: SecretKey) -> Result<Self, ClientError> {
        let trust = match ca_file {
            Some(path) => sitecast_tls::Trust::CaFile(path.to_owned()),
            None => sitecast_tls::Trust::SystemRoots,
        };
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
        };
        let http = match sitecast_tls::client_config(&trust) {
            Ok(tls) => Ok(builder().tls_backend_preconfigured(tls)),
            Err(error) if base.starts_with("https://") => Err(error.to_string()),
            // A plain-HTTP coordinator needs no trust store. reqwest still wants a provider.
            Err(_) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                Ok(builder())
            }
        };
        let http = match http {
            Ok(builder) => {
                Ok(builder.build().map_err(|e| ClientError::Unreachable(e.to_string()))?)
            }
            Err(error) => Err(error),
        };
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), key })
    }

    fn signed(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let http = self.http.as_ref().map_err(|error| ClientError::TlsConfig(error.clone()))?;
        // The server checks the signature over the path and query it received.
        let path = match reqwest::Url::parse(url) {
            Ok(parsed) => match parsed.query() {
                Some(query) => format!("{}?{query}", parsed.path()),
                None => parsed.path().to_owned(),
            },
            Err(_) => url.to_owned(),
        };
        let timestamp = jiff::Timestamp::now().as_second();
        let message = api::appliance_signing_bytes(method.as_str(), &path, timestamp, &body);
        Ok(http
            .request(method, url)
            .header(api::HEADER_APPLIANCE, self.key.public().to_hex())
            .header(api::HEADER_TIMESTAMP, timestamp.to_string())
            .header(api::HEADER_SIGNATURE, self.key.sign(&message).to_hex())
            .header("content-type", "application/json")
            .body(body))
    }

    async fn send(
        &self,
        request: Result<reqwest::RequestBuilder, ClientError>,
    ) -> Result<Bytes, ClientError> {
        let response = request?.send().await.map_err(|error| {
            match sitecast_tls::certificate_refusal(&error) {
                Some(refusal) => ClientError::Certificate(refusal),
                None => ClientError::Unreachable(chain(&error)),
            }
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) => (error.code, error.error),
                Err(_) => {
                    (String::new(), String::from_utf8_lossy(&body).chars().take(200).collect())
                }
            };
            return Err(ClientError::Refused { status: status.as_u16(), code, message });
        }
        Ok(body)
    }

    pub async fn checkin(&self, request: &CheckinRequest) -> Result<CheckinResponse, ClientError> {
        let body = serde_json::to_vec(request).expect("plain data");
        let url = format!("{}/api/appliances/checkin", self.base);
        let answer = self.send(self.signed(reqwest::Method::POST, &url, body)).await?;
        fault::crash_on_answer(&answer, request.agent_release);
        serde_json::from_slice(&answer).map_err(|e| ClientError::Unreadable(e.to_string()))
    }

    /// Sends a report about an image update, or (`agent`) about an agent update.
    pub async fn report(&self, report: &ReportRequest, agent: bool) -> Result<(), ClientError> {
        let body = serde_json::to_vec(report).expect("plain data");
        let path = if agent { "agent-report" } else { "report" };
        let url = format!("{}/api/appliances/{path}", self.base);
        self.send(self.signed(reqwest::Method::POST, &url, body)).await.map(drop)
    }

    /// A signed `GET url` whose body the caller streams (bounded memory whatever the size;
    /// the caller verifies what it reads). An error status is an error.
    pub async fn open_download(&self, url: &str) -> Result<reqwest::Response, ClientError> {
        // A large file over a slow WAN may take longer than the client's request timeout.
        let request = self.signed(reqwest::Method::GET, url, Vec::new())?.timeout(DOWNLOAD_TIMEOUT);
        Self::send_download(request).await
    }

    async fn send_download(
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response =
            request.send().await.map_err(|error| {
                match sitecast_tls::certificate_refusal(&error) {
                    Some(refusal) => ClientError::Certificate(refusal),
                    None => ClientError::Unreachable(chain(&error)),
                }
            })?;
        let status = response.status();
        if !status.is_success() {
            // The first chunk says enough; a hostile server's endless body is not read.
            let mut response = response;
            let body = response.chunk().await.ok().flatten().unwrap_or_default();
            let message = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: String::new(),
                message,
            });
        }
        Ok(response)
    }

    /// The origin's verified ranges for `groups` (ascending, disjoint) in one response, which
    /// the caller streams (compressed if Central Command says so: see `open_compressible`). `start` and `end` name the first range too, so a Central Command
    /// that knows no runs serves that one (without [`api::HEADER_RUNS`] on its answer).
    pub async fn open_ranges(
        &self,
        ranges_url: &str,
        groups: &[std::ops::Range<u64>],
    ) -> Result<reqwest::Response, ClientError> {
        let first = groups.first().cloned().unwrap_or(0..0);
        let mut url = format!("{ranges_url}?start={}&end={}", first.start, first.end);
        if groups.len() > 1 {
            let list: Vec<String> =
                groups.iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
            url = format!("{url}&ranges={}", list.join(","));
        }
        self.open_compressible(&url).await
    }

    /// Plain bytes of the image, the byte `ranges` (ascending, disjoint) one after the other
    /// (`OriginUrls::bytes`), in one response the caller reads. With `reference` (the BLAKE3
    /// of an older image, hex, and a byte range of it), compressed against those bytes if
    /// Central Command can (`api::HEADER_REFERENCE` says so).
    pub async fn open_bytes(
        &self,
        bytes_url: &str,
        ranges: &[std::ops::Range<u64>],
        reference: Option<(&str, std::ops::Range<u64>)>,
    ) -> Result<reqwest::Response, ClientError> {
        let list: Vec<String> = ranges.iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
        let mut url = format!("{bytes_url}?ranges={}", list.join(","));
        if let Some((from, bytes)) = reference {
            url += &format!("&from={from}&reference={}-{}", bytes.start, bytes.end);
        }
        self.open_compressible(&url).await
    }

    /// A download that Central Command sends compressed if it finds the blob worth it: the
    /// answer then says `Content-Encoding: zstd`, and the caller decompresses before it
    /// verifies.
    async fn open_compressible(&self, url: &str) -> Result<reqwest::Response, ClientError> {
        let request = self.signed(reqwest::Method::GET, url, Vec::new())?;
        let request =
            request.timeout(DOWNLOAD_TIMEOUT).header(reqwest::header::ACCEPT_ENCODING, "zstd");
        Self::send_download(request).await
    }
}
