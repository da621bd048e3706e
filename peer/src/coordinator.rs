//! Talking to Central Command: signed check-ins and reports, and verified ranges from the
//! origin.

use std::time::Duration;

use bytes::Bytes;
use sitecast_manifest::SecretKey;
use sitecast_manifest::api::{self, CheckinRequest, CheckinResponse, ErrorBody, ReportRequest};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
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

/// The coordinator does not know this appliance (never enrolled, or removed by an operator).
pub const UNKNOWN_APPLIANCE: (u16, &str) = (403, "unknown_appliance");
/// A report whose sequence number is not above the last one the coordinator accepted.
pub const STALE_REPORT: (u16, &str) = (409, "stale_report");

/// A client signing every request with the appliance key.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    http: reqwest::Client,
    base: String,
    key: SecretKey,
}

impl CoordinatorClient {
    pub fn new(base: &str, key: SecretKey) -> Result<Self, ClientError> {
        // See `sitecast_coordinator::install_tls_provider`: the same reqwest build needs a
        // process-wide rustls provider before a client is built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), key })
    }

    fn signed(&self, method: reqwest::Method, url: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
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
        self.http
            .request(method, url)
            .header(api::HEADER_APPLIANCE, self.key.public().to_hex())
            .header(api::HEADER_TIMESTAMP, timestamp.to_string())
            .header(api::HEADER_SIGNATURE, self.key.sign(&message).to_hex())
            .header("content-type", "application/json")
            .body(body)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Bytes, ClientError> {
        let response = request.send().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
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
        serde_json::from_slice(&answer).map_err(|e| ClientError::Unreadable(e.to_string()))
    }

    pub async fn report(&self, report: &ReportRequest) -> Result<(), ClientError> {
        let body = serde_json::to_vec(report).expect("plain data");
        let url = format!("{}/api/appliances/report", self.base);
        self.send(self.signed(reqwest::Method::POST, &url, body)).await.map(drop)
    }

    /// The origin's verified ranges for groups `start..end` (whole body: one piece at a time
    /// keeps memory bounded by the piece size times the origin requests in flight).
    pub async fn fetch_ranges(
        &self,
        ranges_url: &str,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError> {
        let url = format!("{ranges_url}?start={start}&end={end}");
        self.send(self.signed(reqwest::Method::GET, &url, Vec::new())).await
    }
}
