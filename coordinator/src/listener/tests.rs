//! End-to-end tests over real TCP on 127.0.0.1 with real hyper.
//!
//! The timing tests run on tokio's paused clock, moved by [`PacedClock`] rather than by
//! auto-advance. Auto-advance jumps to the next timer whenever the runtime is idle, and with
//! real sockets "idle" includes the moment the kernel has not yet delivered what a client just
//! sent: a jump then fires a timeout the server should never have reached (seen on a loaded
//! machine). Paced, the clock moves a little per millisecond of
//! real time while the runtime gets to look at its sockets in between, so a timeout that should
//! not fire would need the kernel to sit on data for a good fraction of a second.
//!
//! The sleeps here are of two kinds: the interval of a loop that polls for a condition, and
//! a slow client's own pacing (a head sent in halves, a body a byte a second), which is the
//! behaviour under test; the timing tests run on tokio's paused clock.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use super::*;

const HEADER: Duration = Duration::from_secs(5);
const BODY: Duration = Duration::from_secs(5);
const BODY_IDLE: Duration = Duration::from_secs(5);
const STALL: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(20);
const BUFFERED: u64 = 64 * 1024;
/// Turns a test that would wait forever into a failure: far longer than any test's own waits,
/// on the paused clock where tests use it (a slow machine slows that clock down too).
const HANG: Duration = Duration::from_secs(600);

/// How far [`PacedClock`] moves the paused clock per real millisecond: fast enough for tests
/// that span a minute of their clock, slow enough that the kernel's delivery on loopback keeps
/// well ahead of every margin (the smallest is 2.5 s, some 100 ms of real time).
const PACE: Duration = Duration::from_millis(25);

/// Moves the paused clock by [`PACE`] per millisecond of real time until dropped.
struct PacedClock(JoinHandle<()>);

impl PacedClock {
    fn start() -> Self {
        Self(tokio::spawn(async {
            loop {
                // A blocking task in flight keeps tokio from auto-advancing the paused clock.
                let real_ms = || std::thread::sleep(Duration::from_millis(1));
                let _ = tokio::task::spawn_blocking(real_ms).await;
                tokio::time::advance(PACE).await;
            }
        }))
    }
}

impl Drop for PacedClock {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, future).await {
        Ok(output) => output,
        Err(_) => panic!("still waiting for {what} after {HANG:?}"),
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 100,
        max_connections_per_ip: 100,
        header_read_timeout: HEADER,
        body_read_timeout: BODY,
        buffered_body_bytes: BUFFERED,
        body_idle_timeout: BODY_IDLE,
        write_stall_timeout: STALL,
        idle_timeout: IDLE,
    }
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
const _: () = assert!(ZEROS.len() as u64 == BUFFERED, "some tests send ZEROS as the buffered part");

/// Sets its flag when dropped: shows that whatever fed a response was freed.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the test handlers saw.
#[derive(Default)]
struct Seen {
    /// Bodies the buffering handler received whole.
    buffered: AtomicUsize,
    /// Set once the big response's stream was dropped.
    big_dropped: Arc<AtomicBool>,
}

const BIG_CHUNKS: usize = 512;
const BIG_LEN: usize = BIG_CHUNKS * ZEROS.len();

fn router(seen: Arc<Seen>) -> Router {
    let buffered = Arc::clone(&seen);
    Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        )
        // Like the JSON routes: the extractor buffers the body before the handler runs.
        .route(
            "/buffered",
            post(move |body: Bytes| async move {
                buffered.buffered.fetch_add(1, Ordering::SeqCst);
                body.len().to_string()
            }),
        )
        // Like a route that checks credentials before it reads anything.
        .route("/refuse", post(|| async { StatusCode::UNAUTHORIZED }))
        // Like the image upload: streamed, with the handler's own error when the body fails.
        .route(
            "/upload",
            post(|body: Body| async move {
                let mut stream = body.into_data_stream();
                let mut received = 0;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => received += chunk.len(),
                        Err(_) => {
                            return (StatusCode::BAD_REQUEST, "broken upload").into_response();
                        }
                    }
                }
                received.to_string().into_response()
            }),
        )
        .route(
            "/big",
            get(move || async move {
                let guard = SetOnDrop(Arc::clone(&seen.big_dropped));
                let chunks = futures_util::stream::unfold((BIG_CHUNKS, guard), |(left, guard)| {
                    let chunk = Ok::<_, Infallible>(Bytes::from_static(&ZEROS));
                    async move { (left > 0).then_some((chunk, (left - 1, guard))) }
                });
                let length = [(header::CONTENT_LENGTH, BIG_LEN.to_string())];
                (length, Body::from_stream(chunks)).into_response()
            }),
        )
}

struct Server {
    addr: SocketAddr,
    stats: Stats,
    seen: Arc<Seen>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(limits: Limits) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        Self::spawn(listener, addr, limits)
    }

    fn spawn(listener: impl Accept + 'static, addr: SocketAddr, limits: Limits) -> Self {
        Self::spawn_with_tls(listener, addr, limits, None)
    }

    async fn start_tls(limits: Limits, tls: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        Self::spawn_with_tls(listener, addr, limits, Some(tokio_rustls::TlsAcceptor::from(tls)))
    }

    fn spawn_with_tls(
        listener: impl Accept + 'static,
        addr: SocketAddr,
        limits: Limits,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let (stats, seen) = (Stats::default(), Arc::new(Seen::default()));
        let task = tokio::spawn(accept_loop(
            listener,
            router(Arc::clone(&seen)),
            limits,
            stats.clone(),
            tls,
        ));
        Self { addr, stats, seen, task }
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Polls the counters until `condition` holds.
    async fn until(&self, condition: impl Fn(&StatsSnapshot) -> bool) -> StatsSnapshot {
        let poll = async {
            loop {
                let stats = self.stats();
                if condition(&stats) {
                    return stats;
                }
                sleep(Duration::from_millis(10)).await;
            }
        };
        within("the counters", poll).await
    }

    async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }
}

struct Client {
    rx: Rx,
    tx: OwnedWriteHalf,
}

struct Rx(BufReader<OwnedReadHalf>);

#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct Reply {
    head: Head,
    body: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        Self::wrap(TcpStream::connect(addr).await.expect("connect"))
    }

    async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind((ip, 0).into()).expect("bind the client side");
        Self::wrap(socket.connect(addr).await.expect("connect"))
    }

    fn wrap(stream: TcpStream) -> Self {
        let (rx, tx) = stream.into_split();
        Self { rx: Rx(BufReader::new(rx)), tx }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.tx.write_all(bytes.as_ref()).await.expect("send");
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")).await;
        self.rx.response().await.expect("a response")
    }
}

impl Rx {
    /// `None` if the server closed before sending anything.
    async fn head(&mut self) -> Option<Head> {
        within("a response head", self.read_head()).await
    }

    async fn read_head(&mut self) -> Option<Head> {
        let mut line = String::new();
        match self.0.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.0.read_line(&mut line).await.expect("header line");
            let line = line.trim_end();
            if line.is_empty() {
                return Some(Head { status, headers });
            }
            let (name, value) = line.split_once(':').expect("header");
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
    }

    async fn response(&mut self) -> Option<Reply> {
        within("a response", self.read_response()).await
    }

    async fn read_response(&mut self) -> Option<Reply> {
        let head = self.read_head().await?;
        let mut body = Vec::new();
        if let Some(length) = head.header("content-length") {
            body.resize(length.parse().expect("content length"), 0);
            self.0.read_exact(&mut body).await.expect("body");
        } else if head.header("transfer-encoding") == Some("chunked") {
            let mut line = String::new();
            loop {
                line.clear();
                self.0.read_line(&mut line).await.expect("chunk size");
                let size = usize::from_str_radix(line.trim_end(), 16).expect("hex chunk size");
                let start = body.len();
                body.resize(start + size + 2, 0);
                self.0.read_exact(&mut body[start..]).await.expect("chunk");
                body.truncate(start + size);
                if size == 0 {
                    break;
                }
            }
        }
        Some(Reply { head, body })
    }

    /// Reads until the server closes; how many bytes came first.
    async fn until_closed(&mut self) -> usize {
        let read = async {
            let mut buf = vec![0; 64 * 1024];
            let mut total = 0;
            loop {
                match self.0.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        };
        within("the server to close", read).await
    }
}

/// Whether the server closed the connection without (another) byte of response.
async fn closed_without_reply(client: &mut Client) -> bool {
    client.rx.until_closed().await == 0
}

#[tokio::test]
async fn the_per_ip_limit_refuses_the_extra_connection_and_admits_again_after_a_close() {
    let server = Server::start(Limits { max_connections_per_ip: 2, ..limits() }).await;
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    assert_eq!(first.get("/ok").await.head.status, 200);
    assert_eq!(second.get("/ok").await.head.status, 200);

    let mut third = server.connect().await;
    assert!(
        closed_without_reply(&mut third).await,
        "a third connection from one address is closed"
    );
    // Another address has its own allowance; handlers see which address it is.
    let mut other = Client::connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr).await;
    assert_eq!(other.get("/peer").await.body, b"127.0.0.2");

    drop(first);
    server.until(|s| s.open == 2).await;
    let mut fourth = server.connect().await;
    assert_eq!(fourth.get("/ok").await.head.status, 200, "room again once one closed");
    // Still served after the refusal: keep-alive on an admitted connection.
    assert_eq!(second.get("/ok").await.head.status, 200);

    let stats = server.stats();
    assert_eq!((stats.accepted, stats.refused_over_per_ip, stats.refused_over_total), (4, 1, 0));
    drop((second, other, fourth));
    server.until(|s| s.open == 0).await;
}

#[tokio::test]
async fn the_total_limit_refuses_the_extra_connection_and_admits_again_after_a_close() {
    let server = Server::start(Limits { max_connections: 2, ..limits() }).await;
    let mut first = server.connect().await;
    let mut second = Client::connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr).await;
    assert_eq!(first.get("/ok").await.head.status, 200);
    assert_eq!(second.get("/ok").await.head.status, 200);

    for ip in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 3)] {
        let mut extra = Client::connect_from(ip, server.addr).await;
        assert!(closed_without_reply(&mut extra).await, "over the total, from {ip}");
    }

    drop(second);
    server.until(|s| s.open == 1).await;
    let mut third = server.connect().await;
    assert_eq!(third.get("/ok").await.head.status, 200, "room again once one closed");

    let stats = server.stats();
    assert_eq!((stats.accepted, stats.refused_over_total, stats.refused_over_per_ip), (3, 2, 0));
    drop((first, third));
    server.until(|s| s.open == 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_half_sent_head_is_cut_after_the_header_timeout() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;

    // Every "at least" below is timed from before the client acts, so that the server's own
    // start (the accept, the first byte, the response) can only be later.
    let opened = Instant::now();
    let mut half = server.connect().await;
    half.send("GET /ok HTTP/1.1\r\nHost: test\r\n").await;
    assert!(closed_without_reply(&mut half).await, "closed without an answer");
    assert!(opened.elapsed() >= HEADER, "not before the timeout: {:?}", opened.elapsed());

    // A connection that never says anything is what a slowloris opens: same bound.
    let opened = Instant::now();
    let mut silent = server.connect().await;
    assert!(closed_without_reply(&mut silent).await);
    assert!(opened.elapsed() >= HEADER);

    // A slow head that completes in time is served.
    let mut slow = server.connect().await;
    slow.send("GET /ok HTTP/1.1\r\n").await;
    sleep(HEADER / 2).await;
    slow.send("Host: test\r\n\r\n").await;
    assert_eq!(slow.rx.response().await.expect("served").head.status, 200);

    let stats = server.until(|s| s.open == 1).await;
    assert_eq!((stats.header_timeouts, stats.idle_closes), (2, 0));
}

/// Over TLS the handshake is part of the first head: a client that stalls in it is cut at the
/// same deadline, one that does not speak TLS is counted, and a real client is served.
#[tokio::test(start_paused = true)]
async fn over_tls_a_stalled_handshake_is_cut_like_a_stalled_head() {
    let _clock = PacedClock::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = sitecast_tls::test_ca::TestCa::new("test CA");
    let files = ca.issue(dir.path(), "server", &["localhost"], false);
    let tls = sitecast_tls::server_config(files).expect("server config");
    let server = Server::start_tls(limits(), tls).await;

    let opened = Instant::now();
    let mut stalled = server.connect().await;
    // The first bytes of a TLS record (a handshake, TLS 1.0 framing), and then nothing.
    stalled.send([0x16u8, 0x03, 0x01]).await;
    assert!(closed_without_reply(&mut stalled).await, "closed without an answer");
    assert!(opened.elapsed() >= HEADER, "not before the timeout: {:?}", opened.elapsed());

    let mut plain = server.connect().await;
    plain.send("GET /ok HTTP/1.1\r\nHost: test\r\n\r\n").await;
    // Closed (after at most a TLS alert): counted as a failed handshake below.
    plain.rx.until_closed().await;

    let trust = sitecast_tls::Trust::CaFile(ca.write_root(&dir.path().join("ca.pem")));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        sitecast_tls::client_config(&trust).expect("client config"),
    ));
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, stream).await.expect("handshake");
    tls.write_all(b"GET /ok HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.expect("response");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let stats = server.until(|s| s.open == 0).await;
    assert_eq!((stats.header_timeouts, stats.tls_failures, stats.accepted), (1, 1, 3));
}

#[tokio::test(start_paused = true)]
async fn an_oversized_head_is_refused_not_buffered() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    let padding = "a".repeat(connection::MAX_HEAD_BYTES);
    client.send(format!("GET /ok HTTP/1.1\r\nHost: test\r\nX-Padding: {padding}\r\n")).await;
    // The 431 may be lost to a reset, since the server does not read what it refuses.
    if let Some(head) = client.rx.head().await {
        assert_eq!(head.status, 431);
    }
    assert_eq!(client.rx.until_closed().await, 0);
    let stats = server.until(|s| s.accepted == 1 && s.open == 0).await;
    assert_eq!(stats.header_timeouts, 0, "refused for its size, not its slowness");
}

#[tokio::test(start_paused = true)]
async fn on_a_kept_alive_connection_the_head_timeout_counts_from_its_first_byte() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    assert_eq!(client.get("/ok").await.head.status, 200);
    // Idle for longer than the head timeout but shorter than the idle one: still open.
    sleep(IDLE - HEADER).await;
    let first_byte = Instant::now();
    client.send("GET /ok HTTP/1.1\r\n").await;
    assert!(closed_without_reply(&mut client).await);
    assert!(first_byte.elapsed() >= HEADER);
    let stats = server.until(|s| s.open == 0).await;
    assert_eq!((stats.header_timeouts, stats.idle_closes), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn kept_alive_connections_close_after_the_idle_timeout_not_the_head_timeout() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    assert_eq!(client.get("/ok").await.head.status, 200);
    sleep(IDLE - HEADER).await;
    let asked = Instant::now();
    assert_eq!(client.get("/ok").await.head.status, 200, "reused well past the head timeout");
    assert!(closed_without_reply(&mut client).await, "closed without another byte");
    assert!(asked.elapsed() >= IDLE, "closed {:?} after the last request", asked.elapsed());
    let stats = server.until(|s| s.open == 0).await;
    assert_eq!((stats.idle_closes, stats.header_timeouts), (1, 0));
}

fn post_head(path: &str, length: u64) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n\r\n")
}

#[tokio::test(start_paused = true)]
async fn a_partial_body_gets_a_408_and_never_reaches_the_handler() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut whole = server.connect().await;
    whole.send(post_head("/buffered", 1000) + &"x".repeat(1000)).await;
    let reply = whole.rx.response().await.expect("answered");
    assert_eq!((reply.head.status, reply.body.as_slice()), (200, &b"1000"[..]));
    assert_eq!(server.seen.buffered.load(Ordering::SeqCst), 1);

    // All but the last byte: the attack that held 1 MiB per connection.
    let mut partial = server.connect().await;
    let sent = Instant::now();
    partial.send(post_head("/buffered", 1000) + &"x".repeat(999)).await;
    let reply = partial.rx.response().await.expect("answered");
    assert_eq!(reply.head.status, 408);
    assert_eq!(reply.head.header("connection"), Some("close"));
    assert!(sent.elapsed() >= BODY);
    assert!(closed_without_reply(&mut partial).await, "closed after the 408");

    assert_eq!(server.seen.buffered.load(Ordering::SeqCst), 1, "the handler never ran");
    let stats = server.until(|s| s.open == 1).await;
    assert_eq!(stats.body_timeouts, 1);
}

#[tokio::test]
async fn a_body_answered_unread_closes_the_connection_and_a_read_one_keeps_it() {
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    client.send(post_head("/buffered", 1000) + &"x".repeat(1000)).await;
    let reply = client.rx.response().await.expect("answered");
    assert_eq!((reply.head.status, reply.head.header("connection")), (200, None));
    assert_eq!(client.get("/ok").await.body, b"ok", "the connection carries the next request");

    // Refused with most of its body still to come: a client that reused this connection
    // would send its next request into a socket the server closes.
    client.send(post_head("/refuse", 1 << 20) + &"x".repeat(1000)).await;
    let reply = client.rx.response().await.expect("answered");
    assert_eq!(reply.head.status, 401);
    assert_eq!(reply.head.header("connection"), Some("close"));
    assert!(closed_without_reply(&mut client).await, "closed after the refusal");
}

#[tokio::test(start_paused = true)]
async fn a_trickled_small_body_is_cut_at_the_deadline_though_never_idle() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    let started = Instant::now();
    client.send(post_head("/buffered", 100)).await;
    let Client { rx, tx } = &mut client;
    let trickle = async {
        // A byte a second: never idle for long, never complete.
        for _ in 0..99 {
            let _ = tx.write_all(b"x").await;
            sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await;
    };
    let reply = tokio::select! {
        reply = rx.response() => reply.expect("answered"),
        () = trickle => unreachable!(),
    };
    assert_eq!(reply.head.status, 408);
    assert!(started.elapsed() >= BODY);
    assert!(started.elapsed() < Duration::from_secs(99), "cut before the body could complete");
    assert_eq!(server.seen.buffered.load(Ordering::SeqCst), 0);
    server.until(|s| s.open == 0 && s.body_timeouts == 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_streamed_upload_outlasts_the_body_deadline_while_it_keeps_moving() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    // Past the buffered part with the third piece, well within the deadline; then a piece a
    // second for three deadlines in all.
    let pieces = 3 * BODY.as_secs();
    let piece = BUFFERED / 2;
    let mut client = server.connect().await;
    let started = Instant::now();
    client.send(post_head("/upload", pieces * piece)).await;
    let Client { rx, tx } = &mut client;
    let upload = async {
        for _ in 0..pieces {
            tx.write_all(&ZEROS[..piece as usize]).await.expect("upload piece");
            sleep(Duration::from_secs(1)).await;
        }
    };
    let (reply, ()) = tokio::join!(rx.response(), upload);
    let reply = reply.expect("answered");
    assert_eq!(reply.head.status, 200);
    assert_eq!(reply.body, (pieces * piece).to_string().as_bytes());
    assert!(started.elapsed() >= BODY * 2, "took {:?}", started.elapsed());
    assert_eq!(server.stats().body_timeouts, 0);

    // The same upload stopping after the buffered part: cut once idle.
    let stopped = Instant::now();
    client.send(post_head("/upload", pieces * piece)).await;
    // Twice the buffered part, then nothing.
    client.send(ZEROS).await;
    client.send(ZEROS).await;
    let reply = client.rx.response().await.expect("answered");
    assert_eq!(reply.head.status, 408);
    assert!(stopped.elapsed() >= BODY_IDLE);
    server.until(|s| s.open == 0 && s.body_timeouts == 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_and_the_response_freed() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    let asked = Instant::now();
    client.send("GET /big HTTP/1.1\r\nHost: test\r\n\r\n").await;
    server.until(|s| s.write_stalls == 1 && s.open == 0).await;
    assert!(asked.elapsed() >= STALL);
    assert!(server.seen.big_dropped.load(Ordering::SeqCst), "the response stream was dropped");
    let received = client.rx.until_closed().await;
    assert!(received < BIG_LEN, "only part of the response arrived: {received}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_keeps_reading_gets_everything() {
    let _clock = PacedClock::start();
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    client.send("GET /big HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let started = Instant::now();
    let head = client.rx.head().await.expect("answered");
    assert_eq!(head.status, 200);
    // 1 MiB a second: the server's socket buffer (at most 4 MiB here) has room again every
    // second or two, far more often than the timeout.
    let mut step = vec![0; 1024 * 1024];
    let mut received = 0;
    while received < BIG_LEN {
        let want = step.len().min(BIG_LEN - received);
        within("the body", client.rx.0.read_exact(&mut step[..want])).await.expect("the body");
        received += want;
        sleep(Duration::from_secs(1)).await;
    }
    assert!(started.elapsed() >= STALL * 2, "took {:?}", started.elapsed());
    assert_eq!(server.stats().write_stalls, 0);
    // The connection is still good for another request.
    assert_eq!(client.get("/ok").await.head.status, 200);
}

/// A listener whose first accepts fail, as they do when the process is out of descriptors.
struct Flaky {
    inner: TcpListener,
    errors: Vec<std::io::Error>,
}

impl Accept for Flaky {
    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        match self.errors.pop() {
            Some(error) => Err(error),
            None => self.inner.accept().await,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failed_accepts_do_not_end_the_server() {
    let _clock = PacedClock::start();
    let inner = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = inner.local_addr().expect("bound address");
    const EMFILE: i32 = 24;
    let errors = vec![
        std::io::Error::from_raw_os_error(EMFILE),
        std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
        std::io::Error::from_raw_os_error(EMFILE),
        std::io::Error::from_raw_os_error(EMFILE),
    ];
    let server = Server::spawn(Flaky { inner, errors }, addr, limits());
    let mut client = server.connect().await;
    assert_eq!(client.get("/ok").await.head.status, 200);
    // A peer's aborted handshake is not our failure, and is not counted.
    assert_eq!(server.stats().accept_errors, 3);
}

#[tokio::test]
async fn dropping_the_server_closes_its_connections() {
    let server = Server::start(limits()).await;
    let mut client = server.connect().await;
    assert_eq!(client.get("/ok").await.head.status, 200);
    let stats = server.stats.clone();
    drop(server);
    assert!(closed_without_reply(&mut client).await, "closed by the server going away");
    let drained = async {
        while stats.snapshot().open != 0 {
            sleep(Duration::from_millis(10)).await;
        }
    };
    within("the connection count to drop", drained).await;
}

#[test]
fn the_accept_backoff_grows_to_a_cap_and_resets() {
    let mut backoff = Backoff::new();
    let pauses: Vec<_> = (0..12).map(|_| backoff.next()).collect();
    assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
    assert!(pauses[0] < Duration::from_millis(50), "the first pause is short");
    assert_eq!(pauses[11], Backoff::MAX);
    backoff.reset();
    assert_eq!(backoff.next(), pauses[0]);
}

#[test]
fn rare_log_lets_one_message_through_per_period_and_counts_the_rest() {
    let start = Instant::now();
    let mut log = RareLog::new(Duration::from_secs(60));
    assert_eq!(log.allow(start), Some(0));
    for second in 1..60 {
        assert_eq!(log.allow(start + Duration::from_secs(second)), None);
    }
    assert_eq!(log.allow(start + Duration::from_secs(60)), Some(59));
    assert_eq!(log.allow(start + Duration::from_secs(61)), None);
}
