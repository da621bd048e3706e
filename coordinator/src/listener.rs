//! Serves the router on the open internet with every per-client resource bounded.
//!
//! `axum::serve` trusts its clients: an attack held the server's blocking threads with ~530
//! connections that stopped reading their responses, and grew it from 20 to 435 MiB with 400
//! clients that each sent all but the last byte of a 1 MiB body. [`serve`] is its replacement:
//!
//! - admission (`admission`): at most [`Limits::max_connections`] connections, and at most
//!   [`Limits::max_connections_per_ip`] from one IPv4 address or IPv6 /64; the rest are closed
//!   the moment they are accepted;
//! - request heads and keep-alive idleness (`connection`): a head must arrive within
//!   [`Limits::header_read_timeout`] of its first byte (of the accept, for the first request); a
//!   kept-alive connection with no request for [`Limits::idle_timeout`] is closed;
//! - request bodies (`body`): the part of a body that a handler may buffer in memory must
//!   arrive within a deadline, the rest of a streamed upload only has to keep moving; an
//!   answer given before its body was read (refused credentials, a body over its limit) says
//!   `Connection: close`, since the rest of the body is still on the wire;
//! - responses (`io`): a write that makes no progress for [`Limits::write_stall_timeout`] ends
//!   the connection, which frees whatever was producing the response.
//!
//! With a TLS config the handshake comes first, inside the same head deadline: a client that
//! dawdles in the handshake is the same slowloris as one that dawdles in its head.
//!
//! HTTP/1.1 only (over TLS or not): HTTP/2's streams would need per-stream versions of every
//! bound here.

mod admission;
mod body;
mod connection;
mod io;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use admission::Client;
use admission::{Admission, Refused};

/// Resource bounds for [`serve`]. The defaults suit a server on the internet that serves about
/// ten thousand appliances, a few hundred of them behind one NAT.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted. Keep it below
    /// the process's file descriptor limit, or accepts fail with EMFILE before this bites.
    pub max_connections: usize,
    /// Connections from one IPv4 address or one IPv6 /64 at once.
    pub max_connections_per_ip: usize,
    /// A request head must be complete this long after its first byte (after the accept, for
    /// a connection's first request).
    pub header_read_timeout: Duration,
    /// The first [`Limits::buffered_body_bytes`] of a request body (all of a smaller one) must
    /// arrive within this long of the handler starting to read it.
    pub body_read_timeout: Duration,
    /// How much of a body is held to [`Limits::body_read_timeout`]: the largest body any
    /// handler buffers in memory (the JSON limit). Past it the body is a streamed upload.
    pub buffered_body_bytes: u64,
    /// Past [`Limits::buffered_body_bytes`], a body that delivers no bytes this long fails.
    pub body_idle_timeout: Duration,
    /// A response write that makes no progress this long ends the connection.
    pub write_stall_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_ip: 256,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            buffered_body_bytes: 1024 * 1024,
            body_idle_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of what [`serve`] refused and cut off, for `/metrics`. Cheap to clone; all clones
/// count into the same numbers.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    accepted: AtomicU64,
    refused_over_total: AtomicU64,
    refused_over_per_ip: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    write_stalls: AtomicU64,
    idle_closes: AtomicU64,
    accept_errors: AtomicU64,
    tls_failures: AtomicU64,
}

/// One reading of [`Stats`]. Everything but `open` counts since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections being served now.
    pub open: u64,
    /// Connections admitted.
    pub accepted: u64,
    /// Connections closed at once because [`Limits::max_connections`] were open.
    pub refused_over_total: u64,
    /// Connections closed at once because their address had its share open.
    pub refused_over_per_ip: u64,
    /// Connections closed because a request head did not arrive in time.
    pub header_timeouts: u64,
    /// Requests whose body did not arrive in time (answered 408, connection closed).
    pub body_timeouts: u64,
    /// Connections closed because the client stopped reading the response.
    pub write_stalls: u64,
    /// Kept-alive connections closed for having no request.
    pub idle_closes: u64,
    /// Failed accepts (e.g. EMFILE), each followed by a short pause.
    pub accept_errors: u64,
    /// TLS handshakes that failed (a client refusing our certificate, or not speaking TLS).
    pub tls_failures: u64,
}

impl StatsSnapshot {
    /// Connections or requests cut off for being too slow: header, body and write timeouts.
    pub fn timed_out(&self) -> u64 {
        self.header_timeouts + self.body_timeouts + self.write_stalls
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            open: get(&c.open),
            accepted: get(&c.accepted),
            refused_over_total: get(&c.refused_over_total),
            refused_over_per_ip: get(&c.refused_over_per_ip),
            header_timeouts: get(&c.header_timeouts),
            body_timeouts: get(&c.body_timeouts),
            write_stalls: get(&c.write_stalls),
            idle_closes: get(&c.idle_closes),
            accept_errors: get(&c.accept_errors),
            tls_failures: get(&c.tls_failures),
        }
    }

    fn count(&self, event: Event) {
        let c = &self.0;
        let counter = match event {
            Event::Accepted => &c.accepted,
            Event::Refused(Refused::OverTotal) => &c.refused_over_total,
            Event::Refused(Refused::OverPerIp) => &c.refused_over_per_ip,
            Event::HeaderTimeout => &c.header_timeouts,
            Event::BodyTimeout => &c.body_timeouts,
            Event::WriteStall => &c.write_stalls,
            Event::IdleClose => &c.idle_closes,
            Event::AcceptError => &c.accept_errors,
            Event::TlsFailure => &c.tls_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as open until the returned guard is dropped.
    fn open(&self) -> OpenGuard {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Accepted,
    Refused(Refused),
    HeaderTimeout,
    BodyTimeout,
    WriteStall,
    IdleClose,
    AcceptError,
    TlsFailure,
}

#[derive(Debug)]
struct OpenGuard(Stats);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` within `limits` until the future is dropped, which also
/// closes every connection. Accept errors are logged and retried, never returned. Requests
/// carry `ConnectInfo<SocketAddr>`, as under `into_make_service_with_connect_info`.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) -> std::io::Result<()> {
    serve_with_stats(listener, router, limits, Stats::default(), None).await
}

/// [`serve`], counting into `stats` (create it first and hand a clone to `/metrics`), over
/// TLS if `tls` is given.
pub async fn serve_with_stats(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Stats,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    accept_loop(listener, router, limits, stats, tls).await
}

/// Where connections come from: a [`TcpListener`], or in tests one that fails on purpose.
trait Accept: Send {
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send + '_;
}

impl Accept for TcpListener {
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send + '_ {
        TcpListener::accept(self)
    }
}

async fn accept_loop(
    mut listener: impl Accept,
    router: Router,
    limits: Limits,
    stats: Stats,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip);
    // Owning the connection tasks means dropping `serve` closes them too.
    let mut connections = JoinSet::new();
    let mut refusals = RareLog::new(Duration::from_secs(60));
    let mut failures = RareLog::new(Duration::from_secs(60));
    let mut backoff = Backoff::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(finished) = connections.join_next() => {
                if let Err(error) = finished
                    && error.is_panic()
                {
                    tracing::error!(%error, "a connection task panicked");
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            // The peer gave up between SYN and accept: nothing is wrong with us.
            Err(error) if is_peer_error(&error) => continue,
            Err(error) => {
                stats.count(Event::AcceptError);
                let pause = backoff.next();
                if let Some(suppressed) = failures.allow(Instant::now()) {
                    tracing::warn!(%error, ?pause, suppressed, "accept failed; pausing");
                }
                // EMFILE and friends clear only when connections close; spinning would not help.
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let slot = match admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                stats.count(Event::Refused(refused));
                if let Some(suppressed) = refusals.allow(Instant::now()) {
                    tracing::warn!(%peer, ?refused, suppressed, "connection refused over limit");
                }
                drop(stream);
                continue;
            }
        };
        stats.count(Event::Accepted);
        let open = stats.open();
        let (router, limits, stats) = (router.clone(), Arc::clone(&limits), stats.clone());
        let tls = tls.clone();
        connections.spawn(async move {
            connection::serve(stream, peer, router, &limits, &stats, tls.as_ref()).await;
            drop((slot, open));
        });
    }
}

fn is_peer_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

/// Pauses after failed accepts: short at first so a blip costs little, growing while the
/// failures last so a full descriptor table is not hammered.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Lets a message through at most once per `every`, so a flood of refusals cannot flood the
/// log; reports how many were swallowed since the last one.
#[derive(Debug)]
struct RareLog {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl RareLog {
    fn new(every: Duration) -> Self {
        Self { every, next: None, suppressed: 0 }
    }

    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}
