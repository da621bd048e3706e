//! One connection from admission to close: hyper's HTTP/1.1 state machine over a
//! [`GuardedStream`], the router behind it, and the clock that closes connections which send
//! no request head, or too slow a one.
//!
//! hyper has a `header_read_timeout`, but (in the 1.x we use) it also runs while a kept-alive
//! connection waits for its next request, so the idle timeout could never be longer than the
//! head timeout. Like nginx (`client_header_timeout` vs `keepalive_timeout`) we keep them apart:
//! this module tracks whether a request is in flight and when the next head's first byte came.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::body::{BodyOutcome, BodyPolicy, DeadlineBody};
use super::io::GuardedStream;
use super::{Event, Limits, Stats};

/// The largest request head (start line and headers) accepted; larger ones get 431. hyper's
/// default is its whole read buffer, about 400 KiB, which times the connection limit is a lot
/// of memory for heads; nginx allows 32 KiB.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves one admitted connection until it closes or a bound closes it; over TLS if `tls`.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    stats: &Stats,
    tls: Option<&TlsAcceptor>,
) {
    let activity = Arc::new(Activity::new());
    let io = GuardedStream::new(
        stream,
        limits.write_stall_timeout,
        Arc::clone(&activity),
        stats.clone(),
    );
    let Some(tls) = tls else {
        return serve_http(io, peer, router, limits, stats, activity).await;
    };
    // The handshake is part of the first request's head: it ends by the same deadline.
    let Some((deadline, _)) = activity.deadline(limits) else {
        unreachable!("a new connection has a head deadline")
    };
    match tokio::time::timeout_at(deadline, tls.accept(io)).await {
        Ok(Ok(io)) => serve_http(io, peer, router, limits, stats, activity).await,
        Ok(Err(error)) => {
            stats.count(Event::TlsFailure);
            tracing::debug!(%error, %peer, "TLS handshake failed");
        }
        Err(_) => stats.count(Event::HeaderTimeout),
    }
}

/// HTTP/1.1 on `io` (the guarded socket, or TLS over it) until the connection ends.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    stats: &Stats,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (activity, stats) = (Arc::clone(&activity), stats.clone());
        let policy = BodyPolicy::new(limits);
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            // hyper calls the service as soon as a head is parsed: the request is in flight
            // from here until its response body is dropped.
            let in_flight = activity.begin_request();
            handle(request, peer, router.clone(), policy, stats.clone(), in_flight)
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        // Our own clock does this, see the module comment; also spares hyper a timer.
        .header_read_timeout(None::<std::time::Duration>)
        .max_header_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        let deadline = if closing { None } else { activity.deadline(limits) };
        let changed = activity.changed.notified();
        let expiry = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = changed => {}
            () = expiry => match activity.deadline(limits) {
                // Re-read: the phase may have changed while the timer was firing.
                Some((at, Expiry::Head)) if at <= Instant::now() => {
                    stats.count(Event::HeaderTimeout);
                    // Nothing is in flight, so there is no response to finish.
                    return;
                }
                Some((at, Expiry::Idle)) if at <= Instant::now() => {
                    stats.count(Event::IdleClose);
                    // Lets hyper finish flushing the last response (bounded by the write-stall
                    // timeout) and close, or serve a request that raced in.
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ => {}
            },
        }
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    router: Router,
    policy: BodyPolicy,
    stats: Stats,
    in_flight: InFlight,
) -> Result<Response<ResponseBody>, Infallible> {
    let outcome = BodyOutcome::default();
    let has_body = !request.body().is_end_stream();
    let mut request = request.map(|body| DeadlineBody::new(body, policy, outcome.clone(), stats));
    // What `into_make_service_with_connect_info::<SocketAddr>()` provides under axum::serve.
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(mut response) = router.oneshot(request).await;
    if outcome.timed_out() {
        // The handler saw a failed body (as a 400 from an extractor, or its own error): say
        // what happened.
        response = (StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time\n")
            .into_response();
    }
    if has_body && !outcome.read_to_end() {
        // Answered before the body was read (refused credentials, a body over its limit, a
        // timeout): the rest of it is still on the wire, so this connection cannot carry
        // another request. Saying so keeps a client from sending its next request into a
        // socket the server is about to close.
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response.map(|body| ResponseBody { body, _in_flight: in_flight }))
}

/// A response body that keeps its request counted as in flight until hyper is done with it.
#[derive(Debug)]
struct ResponseBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a connection is doing, as far as its clock is concerned.
#[derive(Debug)]
pub(super) struct Activity {
    phase: Mutex<Phase>,
    /// Woken on every phase change that can move the deadline.
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in flight; waiting for a head since `since`.
    Waiting {
        since: Instant,
        /// When the first byte after `since` arrived.
        first_byte: Option<Instant>,
        /// No request yet on this connection.
        fresh: bool,
    },
    /// Requests in flight: from head parsed to response body dropped. Their bodies and
    /// responses have their own bounds.
    Busy(usize),
}

/// Which bound a connection's deadline enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Head,
    Idle,
}

impl Activity {
    fn new() -> Self {
        let phase = Phase::Waiting { since: Instant::now(), first_byte: None, fresh: true };
        Self { phase: Mutex::new(phase), changed: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        // Every update is a single assignment, so a poisoned phase is still a valid one.
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the socket for every read that returned data.
    pub(super) fn bytes_read(&self) {
        let mut phase = self.lock();
        if let Phase::Waiting { first_byte: first_byte @ None, .. } = &mut *phase {
            *first_byte = Some(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        let mut phase = self.lock();
        *phase = match *phase {
            Phase::Waiting { .. } => Phase::Busy(1),
            Phase::Busy(n) => Phase::Busy(n + 1),
        };
        drop(phase);
        self.changed.notify_one();
        InFlight(Arc::clone(self))
    }

    fn end_request(&self) {
        let mut phase = self.lock();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Waiting { since: Instant::now(), first_byte: None, fresh: false },
        };
        drop(phase);
        self.changed.notify_one();
    }

    /// When the connection is to be closed if nothing changes, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        match *self.lock() {
            Phase::Busy(_) => None,
            // A new connection gets the head timeout from the start: one that never sends
            // anything is exactly the connection a slowloris opens.
            Phase::Waiting { since, fresh: true, .. } => {
                Some((since + limits.header_read_timeout, Expiry::Head))
            }
            Phase::Waiting { first_byte: Some(at), .. } => {
                Some((at + limits.header_read_timeout, Expiry::Head))
            }
            Phase::Waiting { since, first_byte: None, .. } => {
                Some((since + limits.idle_timeout, Expiry::Idle))
            }
        }
    }
}

/// A request counted as in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}
