//! Request bodies that must keep arriving.
//!
//! Two kinds of body reach the handlers: JSON (and multipart manifests) that a handler buffers
//! whole, at most [`Limits::buffered_body_bytes`], and image uploads of many GiB streamed to
//! disk. A client that trickles a buffered body holds its memory; a client that stops an
//! upload holds a connection and a file. A single total deadline would kill honest uploads over
//! slow links, and an idle timeout alone lets a trickle (one byte every few seconds) hold a
//! nearly complete buffered body for hours. So:
//!
//! - the first [`Limits::buffered_body_bytes`] must arrive within [`Limits::body_read_timeout`]
//!   of the handler's first read: a JSON body must arrive whole, an upload must get going
//!   (about 35 KB/s for 1 MiB in 30 s);
//! - past that only [`Limits::body_idle_timeout`] applies: some bytes every so often.
//!
//! The count is of bytes received, not declared, so a false `Content-Length` or chunked
//! encoding changes nothing. A body that fails is answered with 408 by [`super::connection`].
//!
//! [`Limits::buffered_body_bytes`]: super::Limits::buffered_body_bytes
//! [`Limits::body_read_timeout`]: super::Limits::body_read_timeout
//! [`Limits::body_idle_timeout`]: super::Limits::body_idle_timeout

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{Event, Limits, Stats};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("request body {0}")]
pub(super) struct BodyTimeout(&'static str);

/// The bounds of [`DeadlineBody`], taken from [`Limits`].
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyPolicy {
    deadline: Duration,
    deadline_bytes: u64,
    idle: Duration,
}

impl BodyPolicy {
    pub(super) fn new(limits: &Limits) -> Self {
        Self {
            deadline: limits.body_read_timeout,
            deadline_bytes: limits.buffered_body_bytes,
            idle: limits.body_idle_timeout,
        }
    }
}

/// How a body ended, read by the connection once the handler has answered.
#[derive(Debug, Clone, Default)]
pub(super) struct BodyOutcome(Arc<Flags>);

#[derive(Debug, Default)]
struct Flags {
    /// The body failed, so the response becomes a 408.
    timed_out: AtomicBool,
    /// The handler read the body to its end.
    read_to_end: AtomicBool,
}

impl BodyOutcome {
    pub(super) fn timed_out(&self) -> bool {
        self.0.timed_out.load(Ordering::Relaxed)
    }

    pub(super) fn read_to_end(&self) -> bool {
        self.0.read_to_end.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub(super) struct DeadlineBody<B> {
    inner: B,
    policy: BodyPolicy,
    received: u64,
    /// When the handler first asked for data; the deadline counts from there, so a handler
    /// that checks credentials first does not eat into the client's time.
    started: Option<Instant>,
    /// Created at the first wait, so bodies that are already complete cost no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is set for the current wait; the idle time counts from the moment
    /// the handler asks and nothing is there, not from the last chunk, so a handler that is
    /// slow to come back (a slow disk) is not blamed on the client.
    waiting: bool,
    failed: Option<&'static str>,
    outcome: BodyOutcome,
    stats: Stats,
}

impl<B> DeadlineBody<B> {
    pub(super) fn new(inner: B, policy: BodyPolicy, outcome: BodyOutcome, stats: Stats) -> Self {
        Self {
            inner,
            policy,
            received: 0,
            started: None,
            timer: None,
            waiting: false,
            failed: None,
            outcome,
            stats,
        }
    }

    fn streaming(&self) -> bool {
        self.received > self.policy.deadline_bytes
    }

    /// When the body fails if nothing more arrives.
    fn due(&self, started: Instant) -> Instant {
        if self.streaming() {
            Instant::now() + self.policy.idle
        } else {
            started + self.policy.deadline
        }
    }

    fn why(&self) -> &'static str {
        if self.streaming() {
            "stalled while streaming"
        } else {
            "not received within the deadline"
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(why) = this.failed {
            return Poll::Ready(Some(Err(BodyTimeout(why).into())));
        }
        let started = *this.started.get_or_insert_with(Instant::now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                }
                // A handler may stop at the last frame without asking for the end.
                if this.inner.is_end_stream() {
                    this.outcome.0.read_to_end.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => {
                this.timer = None;
                this.outcome.0.read_to_end.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let due = this.due(started);
                let timer =
                    this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(due);
                }
                ready!(timer.as_mut().poll(cx));
                let why = this.why();
                this.failed = Some(why);
                this.outcome.0.timed_out.store(true, Ordering::Relaxed);
                this.stats.count(Event::BodyTimeout);
                Poll::Ready(Some(Err(BodyTimeout(why).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
