//! Write coalescing under the stream multiplexer.
//!
//! Yamux flushes its socket after every frame it writes, and under Noise every flush is one
//! encrypted message and one `send` system call. A request-response exchange is several small
//! frames (stream open, data, close, in each direction), so a node serving many requests at once
//! spent much of its time encrypting and sending tiny messages. [`CoalescingIo`] sits between
//! Noise and Yamux and holds back the flushes Yamux asks for while a connection task is being
//! polled, flushing once when the task has nothing more to do:
//!
//! - when the socket has nothing more to read (Yamux's last step before it waits), or
//! - at the latest on the task's next poll: the task's executor wrapper ([`MarkedTask`], spawned
//!   by [`MarkingExecutor`]) wakes a task that ends a poll with a flush still held back, and the
//!   first flush of a later poll is always performed.
//!
//! A connection task that is itself waiting (its event for the swarm is queued behind a full
//! channel) does not poll the muxer, so a held flush then waits with it: until the swarm takes
//! the event, not indefinitely. Noise sends on its own whenever its buffer (one maximal message)
//! fills, so held bytes are bounded.
//!
//! Bytes, their order and the Noise encryption are unchanged; only how many bytes go out in one
//! Noise message (and one system call) changes, so the wire stays the same for any peer. A
//! socket polled outside a marked task (tests, another executor) flushes at once, as before.
//! Closing always flushes.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Identifies task polls: each poll of a [`MarkedTask`] takes the next number (0 is "none").
static NEXT_POLL: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The poll of the marked task running on this thread, or 0.
    static CURRENT_POLL: Cell<u64> = const { Cell::new(0) };
    /// Flushes held back during the current poll and not yet performed.
    static OWED_FLUSHES: Cell<usize> = const { Cell::new(0) };
}

/// Restores the thread's poll marks when a marked poll ends, even by a panic.
struct PollMark {
    outer_poll: u64,
    outer_owed: usize,
}

impl PollMark {
    fn enter() -> Self {
        let id = NEXT_POLL.fetch_add(1, Ordering::Relaxed);
        Self { outer_poll: CURRENT_POLL.replace(id), outer_owed: OWED_FLUSHES.replace(0) }
    }

    /// Leaves the poll; returns how many flushes it still owes.
    fn owed(&self) -> usize {
        OWED_FLUSHES.get()
    }
}

impl Drop for PollMark {
    fn drop(&mut self) {
        CURRENT_POLL.set(self.outer_poll);
        OWED_FLUSHES.set(self.outer_owed);
    }
}

/// A connection task: marks each of its polls (see the module documentation) and wakes itself
/// when a poll ends with a flush held back.
pub(crate) struct MarkedTask {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Future for MarkedTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mark = PollMark::enter();
        let result = self.inner.as_mut().poll(cx);
        if result.is_pending() && mark.owed() > 0 {
            cx.waker().wake_by_ref();
        }
        drop(mark);
        result
    }
}

/// The swarm's executor: spawns each connection task on tokio as a [`MarkedTask`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MarkingExecutor;

impl libp2p::swarm::Executor for MarkingExecutor {
    fn exec(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(MarkedTask { inner: future });
    }
}

/// A socket whose flushes are held back within one task poll (see the module documentation).
#[derive(Debug)]
pub(crate) struct CoalescingIo<T> {
    io: T,
    /// Bytes were written since the last completed flush.
    dirty: bool,
    /// A flush was started and returned `Pending`: flushes go through until one completes.
    flushing: bool,
    /// The task poll in which a flush was held back, if one is.
    held_in: Option<u64>,
}

impl<T> CoalescingIo<T> {
    pub(crate) fn new(io: T) -> Self {
        Self { io, dirty: false, flushing: false, held_in: None }
    }

    /// Forgets a held-back flush (it is being performed now).
    fn release_held(&mut self) {
        if let Some(poll) = self.held_in.take()
            && poll == CURRENT_POLL.get()
            && poll != 0
        {
            OWED_FLUSHES.set(OWED_FLUSHES.get().saturating_sub(1));
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    fn flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.release_held();
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        match &flushed {
            Poll::Ready(Ok(())) => {
                self.dirty = false;
                self.flushing = false;
            }
            Poll::Pending => self.flushing = true,
            Poll::Ready(Err(_)) => self.flushing = false,
        }
        flushed
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending()
            && this.held_in.is_some()
            && let Poll::Ready(Err(e)) = this.flush_now(cx)
        {
            return Poll::Ready(Err(e));
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.dirty = true;
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.dirty && !this.flushing {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        let current = CURRENT_POLL.get();
        if current != 0 && !this.flushing {
            match this.held_in {
                Some(poll) if poll == current => return Poll::Ready(Ok(())),
                None => {
                    this.held_in = Some(current);
                    OWED_FLUSHES.set(OWED_FLUSHES.get().saturating_add(1));
                    return Poll::Ready(Ok(()));
                }
                // Held back in an earlier poll of the task: flush now.
                Some(_) => {}
            }
        }
        this.flush_now(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.release_held();
        Pin::new(&mut this.io).poll_close(cx)
    }
}

/// A connection upgrade (the multiplexer's) applied over a [`CoalescingIo`] of the socket.
#[derive(Debug, Clone)]
pub(crate) struct Coalescing<U>(pub(crate) U);

impl<U: UpgradeInfo> UpgradeInfo for Coalescing<U> {
    type Info = U::Info;
    type InfoIter = U::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.protocol_info()
    }
}

impl<C, U> InboundConnectionUpgrade<C> for Coalescing<U>
where
    U: InboundConnectionUpgrade<CoalescingIo<C>>,
{
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0.upgrade_inbound(CoalescingIo::new(socket), info)
    }
}

impl<C, U> OutboundConnectionUpgrade<C> for Coalescing<U>
where
    U: OutboundConnectionUpgrade<CoalescingIo<C>>,
{
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0.upgrade_outbound(CoalescingIo::new(socket), info)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use futures::task::{ArcWake, waker};

    use super::*;

    /// A socket that never has anything to read and counts what reaches it.
    #[derive(Debug, Default)]
    struct Socket {
        written: Vec<u8>,
        flushes: usize,
    }

    impl AsyncRead for Socket {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut [u8]) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn write_and_flush(io: &mut CoalescingIo<Socket>, cx: &mut Context<'_>, bytes: &[u8]) {
        assert!(matches!(Pin::new(&mut *io).poll_write(cx, bytes), Poll::Ready(Ok(n)) if n == bytes.len()));
        assert!(matches!(Pin::new(&mut *io).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    #[test]
    fn outside_a_marked_task_every_flush_goes_through() {
        let wakes = Arc::new(Wakes::default());
        let waker = waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Socket::default());
        write_and_flush(&mut io, &mut cx, b"a");
        write_and_flush(&mut io, &mut cx, b"b");
        assert_eq!(io.io.flushes, 2);
        assert_eq!(io.io.written, b"ab");
    }

    #[test]
    fn a_marked_poll_flushes_once_when_the_socket_has_nothing_to_read_and_wakes_a_task_that_owes_one() {
        let wakes = Arc::new(Wakes::default());
        let waker = waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Socket::default());

        // One poll: two frames, each flushed by the muxer, then a read that finds nothing.
        let mark = PollMark::enter();
        write_and_flush(&mut io, &mut cx, b"a");
        write_and_flush(&mut io, &mut cx, b"b");
        assert_eq!(io.io.flushes, 0, "held back within the poll");
        assert_eq!(mark.owed(), 1);
        let mut buf = [0u8; 4];
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(io.io.flushes, 1, "flushed once, when there is nothing more to read");
        assert_eq!(mark.owed(), 0);
        drop(mark);

        // A poll that ends owing a flush wakes its task; the next poll's first flush goes out.
        let mut task = MarkedTask {
            inner: Box::pin({
                let mut io = Some(io);
                let mut done = false;
                futures::future::poll_fn(move |cx| {
                    let socket = io.as_mut().expect("socket");
                    if done {
                        assert!(matches!(Pin::new(&mut *socket).poll_flush(cx), Poll::Ready(Ok(()))));
                        assert_eq!(socket.io.flushes, 2, "the flush held in the earlier poll goes out now");
                        return Poll::Ready(());
                    }
                    done = true;
                    write_and_flush(socket, cx, b"c");
                    Poll::Pending
                })
            }),
        };
        let before = wakes.0.load(Ordering::SeqCst);
        assert!(Pin::new(&mut task).poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), before + 1, "a poll that owes a flush wakes its task");
        assert!(Pin::new(&mut task).poll(&mut cx).is_ready());
    }
}
