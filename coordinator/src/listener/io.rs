//! The accepted socket as hyper sees it: writes fail once they stall, and reads are reported to
//! the connection's [`Activity`] so it can tell an idle connection from one sending a head.
//!
//! A client that stops reading leaves a response write pending forever, and with it whatever
//! feeds the response (a file, a blocking thread, a channel). Failing the write ends the
//! connection and drops all of that. Only a write with no progress counts: a slow reader of a
//! multi-GiB image keeps making progress and is never cut. Progress shows when the kernel takes
//! more bytes, once about a third of the socket's send buffer is acknowledged; Linux sizes that
//! buffer to the connection's window, so a client reading at any steady rate gets there every
//! few round trips.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::connection::Activity;
use super::{Event, Stats};

#[derive(Debug)]
pub(super) struct GuardedStream {
    stream: TcpStream,
    stall_timeout: Duration,
    /// Armed while a write is pending; reset on every byte written.
    stall: Pin<Box<Sleep>>,
    stalling: bool,
    activity: Arc<Activity>,
    stats: Stats,
}

impl GuardedStream {
    pub(super) fn new(
        stream: TcpStream,
        stall_timeout: Duration,
        activity: Arc<Activity>,
        stats: Stats,
    ) -> Self {
        Self {
            stream,
            stall_timeout,
            stall: Box::pin(tokio::time::sleep(stall_timeout)),
            stalling: false,
            activity,
            stats,
        }
    }

    /// Turns a pending write into an error once it has been pending for the whole timeout.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        if written.is_ready() {
            self.stalling = false;
            return written;
        }
        if !self.stalling {
            self.stalling = true;
            self.stall.as_mut().reset(Instant::now() + self.stall_timeout);
        }
        ready!(self.stall.as_mut().poll(cx));
        self.stats.count(Event::WriteStall);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("response write made no progress for {:?}", self.stall_timeout),
        )))
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
