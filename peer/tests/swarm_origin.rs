//! The swarm on its own against a real origin: every piece fetched over HTTP, verified, written.

mod common;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use sitecast_iso::{ResponseDecoder, Slot, SlotPaths, SlotWriter};
use sitecast_manifest::{Blake3Hash, SecretKey};
use sitecast_peer::coordinator::CoordinatorClient;
use sitecast_peer::scheduler::PeerId;
use sitecast_peer::swarm::{Swarm, TransferStats};

/// What a lone appliance's swarm did, filling its slot from `origin` (through `via`, a
/// stand-in for the origin's URL, when given).
struct Filled {
    stats: TransferStats,
    origin_bytes: u64,
}

/// Fills a slot from the origin; with `every_other_held`, every other piece is in the slot
/// before the swarm starts (as after a restart), so each origin run names several ranges.
async fn fill_from_origin(
    dir: &std::path::Path,
    via: Option<&dyn Fn(&str) -> String>,
    every_other_held: bool,
    request_timeout: Option<std::time::Duration>,
) -> Filled {
    let origin = Origin::start(dir).await;
    let (image_path, image) = origin.publish(2, 5 * 1024 * 1024 + 4321).await;

    let key = SecretKey::generate().expect("rng");
    let client = CoordinatorClient::new(&origin.url, None, key.clone()).expect("client");
    let request = lone_checkin("lab", "solo");
    client.checkin(&request).await.expect("enrolled");
    origin.rollout(2).await;
    let offer = client.checkin(&request).await.expect("checkin");
    assert!(offer.update_available);
    let mut ranges = offer.origin.expect("origin").ranges;

    let slot = dir.join("slot-b.img");
    std::fs::File::create(&slot).expect("slot").set_len(image.size + 4096).expect("size");
    let mut writer =
        SlotWriter::open_paths(Slot::B, &image, &SlotPaths::beside(&slot, dir)).expect("writer");
    let mut held = 0;
    if every_other_held {
        let layout = writer.layout();
        let pieces = sitecast_peer::swarm::piece_layout(&layout);
        for piece in (0..pieces.pieces()).step_by(2) {
            let groups = pieces.groups_of(piece);
            let response =
                client.open_ranges(&ranges, std::slice::from_ref(&groups)).await.expect("piece");
            let body = response.bytes().await.expect("body");
            let chunks = layout.chunk_ranges(groups);
            let decoder = ResponseDecoder::new(layout, &chunks, &body[..]).expect("header");
            writer.ingest(decoder).expect("verifies");
            held += 1;
        }
    }
    if let Some(via) = via {
        ranges = via(&ranges);
    }
    let (_news_tx, news) = tokio::sync::mpsc::channel(8);
    let (announce, _announced) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(Mutex::new(TransferStats::default()));
    let swarm = Swarm::new(
        PeerId(*key.public().as_bytes()),
        writer,
        Some((client, ranges)),
        None,
        news,
        announce,
        stats.clone(),
        |config| {
            config.discovery_grace = std::time::Duration::ZERO;
            if let Some(timeout) = request_timeout {
                config.request_timeout = timeout;
            }
        },
    );
    let writer = swarm.run().await.expect("swarm completes");
    writer.finish().expect("read back matches the manifest");
    let written = std::fs::read(&slot).expect("slot");
    assert_eq!(&written[..image.size as usize], &std::fs::read(&image_path).expect("image")[..]);
    let stats = *stats.lock().expect("stats");
    assert_eq!(stats.pieces_from_lan, 0);
    assert_eq!(stats.pieces_from_origin + held, stats.pieces_total, "{stats:?}");
    Filled { stats, origin_bytes: origin.origin_bytes("lab", 2).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_appliance_fills_its_slot_from_the_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Filled { stats, origin_bytes } = fill_from_origin(dir.path(), None, false, None).await;
    assert_eq!(origin_bytes, stats.bytes_from_origin);
    assert!(stats.bytes_from_origin >= 5 * 1024 * 1024 + 4321, "{stats:?}");
    // The pieces came in runs, each parent once: less than a request per piece, each with
    // its ancestors, would have taken.
    let layout = sitecast_iso::BlobLayout::new(Blake3Hash([0; 32]), 5 * 1024 * 1024 + 4321);
    let pieces = sitecast_peer::swarm::piece_layout(&layout);
    let apart: u64 = (0..pieces.pieces()).map(|p| layout.encoded_len(pieces.groups_of(p))).sum();
    assert!(stats.bytes_from_origin < apart, "{stats:?}: no more than {apart} a piece at a time");
}

/// A Central Command older than origin runs answers only `start..end` of a request and says
/// nothing of runs: a relay that cuts each answer to that (the first range's encoding is the
/// start of the run's) stands in for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_command_without_runs_still_fills_the_slot_range_by_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = OldOriginRelay::start(5 * 1024 * 1024 + 4321).await;
    let via = |ranges: &str| relay.rewrite(ranges);
    let Filled { stats, .. } = fill_from_origin(dir.path(), Some(&via), true, None).await;
    let asked = relay.requests();
    assert!(asked > 1, "one request for everything");
    assert!(relay.cut() > 0, "the relay never cut an answer: the test tests nothing");
    assert_eq!(stats.failed, 0, "{stats:?}: an old Central Command's answers count as failures");
}

/// Stands in for a Central Command that predates origin runs: it passes each verified-range
/// request on to the real one unchanged (the appliance's signature covers it), then answers
/// with `start..end` alone, as the old one would, and without the runs header.
struct OldOriginRelay {
    url: String,
    state: Arc<RelayState>,
}

struct RelayState {
    upstream: Mutex<String>,
    layout: sitecast_iso::BlobLayout,
    http: reqwest::Client,
    requests: AtomicUsize,
    cut: AtomicUsize,
}

impl OldOriginRelay {
    async fn start(image_size: u64) -> Self {
        sitecast_coordinator::install_tls_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(RelayState {
            upstream: Mutex::new(String::new()),
            layout: sitecast_iso::BlobLayout::new(Blake3Hash([0; 32]), image_size),
            http: reqwest::Client::new(),
            requests: AtomicUsize::new(0),
            cut: AtomicUsize::new(0),
        });
        let app = axum::Router::new().fallback(relay).with_state(Arc::clone(&state));
        tokio::spawn(axum::serve(listener, app).into_future());
        Self { url, state }
    }

    /// The relay's URL for the origin's `ranges` URL.
    fn rewrite(&self, ranges: &str) -> String {
        let path = ranges.find("/api/").expect("an origin path");
        *self.state.upstream.lock().expect("upstream") = ranges[..path].to_owned();
        format!("{}{}", self.url, &ranges[path..])
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn cut(&self) -> usize {
        self.state.cut.load(Ordering::SeqCst)
    }
}

async fn relay(
    axum::extract::State(state): axum::extract::State<Arc<RelayState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = request.uri().path_and_query().expect("path").as_str().to_owned();
    let upstream = state.upstream.lock().expect("upstream").clone();
    let mut forward = state.http.get(format!("{upstream}{path}"));
    for (name, value) in request.headers() {
        if name.as_str().starts_with("x-sitecast") {
            forward = forward.header(name.as_str(), value.as_bytes());
        }
    }
    let response = forward.send().await.expect("upstream answers");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    state.requests.fetch_add(1, Ordering::SeqCst);
    let query = request.uri().query().unwrap_or_default();
    let field = |name: &str| -> u64 {
        let pair = query.split('&').find_map(|pair| pair.strip_prefix(&format!("{name}=")));
        pair.expect("start and end are always sent").parse().expect("a number")
    };
    let keep = state.layout.encoded_len(field("start")..field("end")) as usize;
    if status != 200 || body.len() <= keep {
        return (axum::http::StatusCode::from_u16(status).expect("status"), body).into_response();
    }
    state.cut.fetch_add(1, Ordering::SeqCst);
    body.slice(..keep).into_response()
}

/// An origin run that stops sending is given up after the request timeout, and giving it up
/// closes its connection (it once kept streaming in its decoding thread: the origin sent
/// what nobody would use, and held one of the site's range streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_given_up_closes_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = StallingRelay::start().await;
    let via = |ranges: &str| relay.rewrite(ranges);
    let timeout = Some(std::time::Duration::from_millis(300));
    let Filled { stats, .. } = fill_from_origin(dir.path(), Some(&via), false, timeout).await;
    assert!(stats.pieces_from_origin > 0, "{stats:?}");
    // The slot is complete: the stalled run's pieces came again. Its connection was closed
    // when it was given up, a second (the origin backoff) before they were asked again.
    assert!(relay.state.stalled.load(Ordering::SeqCst), "no answer was stalled");
    assert!(relay.state.closed.load(Ordering::SeqCst), "the stalled connection is still open");
}

/// Passes verified-range requests to the origin, one connection each; the first answer stops
/// halfway (its length promised in full) and the connection is held until the client closes.
struct StallingRelay {
    url: String,
    state: Arc<StallState>,
}

struct StallState {
    upstream: Mutex<String>,
    http: reqwest::Client,
    requests: AtomicUsize,
    stalled: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

impl StallingRelay {
    async fn start() -> Self {
        sitecast_coordinator::install_tls_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(StallState {
            upstream: Mutex::new(String::new()),
            http: reqwest::Client::new(),
            requests: AtomicUsize::new(0),
            stalled: Default::default(),
            closed: Default::default(),
        });
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(stall_or_pass(socket, Arc::clone(&serving)));
            }
        });
        Self { url, state }
    }

    fn rewrite(&self, ranges: &str) -> String {
        let path = ranges.find("/api/").expect("an origin path");
        *self.state.upstream.lock().expect("upstream") = ranges[..path].to_owned();
        format!("{}{}", self.url, &ranges[path..])
    }
}

async fn stall_or_pass(mut socket: tokio::net::TcpStream, state: Arc<StallState>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(head) = read_request_head(&mut socket).await else { return };
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|l| l.split(' ').nth(1)).expect("a request line").to_owned();
    let upstream = state.upstream.lock().expect("upstream").clone();
    let mut forward = state.http.get(format!("{upstream}{path}"));
    for line in lines {
        if let Some((name, value)) = line.split_once(": ")
            && name.to_ascii_lowercase().starts_with("x-sitecast")
        {
            forward = forward.header(name, value);
        }
    }
    let response = forward.send().await.expect("upstream answers");
    let status = response.status().as_u16();
    let runs = response.headers().contains_key(sitecast_manifest::api::HEADER_RUNS);
    let body = response.bytes().await.expect("body");
    let first = state.requests.fetch_add(1, Ordering::SeqCst) == 0;
    let runs = if runs { "x-sitecast-runs: 1\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{runs}\r\n",
        body.len()
    );
    let sent = if first && status == 200 { body.len() / 2 } else { body.len() };
    if socket.write_all(head.as_bytes()).await.is_err()
        || socket.write_all(&body[..sent]).await.is_err()
    {
        return;
    }
    if sent < body.len() {
        state.stalled.store(true, Ordering::SeqCst);
        // Nothing more is sent; the client's close ends the read.
        let mut rest = [0u8; 64];
        while let Ok(n) = socket.read(&mut rest).await {
            if n == 0 {
                break;
            }
        }
        state.closed.store(true, Ordering::SeqCst);
    }
}
