//! Support for creating futures that represent timeouts.
//!
//! This module contains the `Delay` type which is a future that will resolve
//! at a particular point in the future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::arc_list::Node;
use super::AtomicWaker;
use super::{ScheduledTimer, TimerHandle};

/// The original timer: a `Delay` registered with the helper thread.
pub(crate) struct NativeDelay {
    state: Option<Arc<Node<ScheduledTimer>>>,
}

impl NativeDelay {
    /// Creates a new future which will fire at `dur` time into the future.
    ///
    /// The returned object will be bound to the default timer for this thread.
    /// The default timer will be spun up in a helper thread on first use.
    #[inline]
    pub fn new(dur: Duration) -> NativeDelay {
        NativeDelay::new_handle(Instant::now() + dur, Default::default())
    }

    /// Creates a new future which will fire at the time specified by `at`.
    ///
    /// The returned instance of `Delay` will be bound to the timer specified by
    /// the `handle` argument.
    pub(crate) fn new_handle(at: Instant, handle: TimerHandle) -> NativeDelay {
        let inner = match handle.inner.upgrade() {
            Some(i) => i,
            None => return NativeDelay { state: None },
        };
        let state = Arc::new(Node::new(ScheduledTimer {
            at: Mutex::new(Some(at)),
            state: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
            inner: handle.inner,
            slot: Mutex::new(None),
        }));

        // If we fail to actually push our node then we've become an inert
        // timer, meaning that we'll want to immediately return an error from
        // `poll`.
        if inner.list.push(&state).is_err() {
            return NativeDelay { state: None };
        }

        inner.waker.wake();
        NativeDelay { state: Some(state) }
    }

    /// Resets this timeout to an new timeout which will fire at the time
    /// specified by `at`.
    #[inline]
    pub fn reset(&mut self, dur: Duration) {
        if self._reset(dur).is_err() {
            self.state = None
        }
    }

    fn _reset(&mut self, dur: Duration) -> Result<(), ()> {
        let state = match self.state {
            Some(ref state) => state,
            None => return Err(()),
        };
        if let Some(timeouts) = state.inner.upgrade() {
            let mut bits = state.state.load(SeqCst);
            loop {
                // If we've been invalidated, cancel this reset
                if bits & 0b10 != 0 {
                    return Err(());
                }
                let new = bits.wrapping_add(0b100) & !0b11;
                match state.state.compare_exchange(bits, new, SeqCst, SeqCst) {
                    Ok(_) => break,
                    Err(s) => bits = s,
                }
            }
            *state.at.lock().unwrap() = Some(Instant::now() + dur);
            // If we fail to push our node then we've become an inert timer, so
            // we'll want to clear our `state` field accordingly
            timeouts.list.push(state)?;
            timeouts.waker.wake();
        }

        Ok(())
    }
}

impl Future for NativeDelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = match self.state {
            Some(ref state) => state,
            None => panic!("timer has gone away"),
        };

        if state.state.load(SeqCst) & 1 != 0 {
            return Poll::Ready(());
        }

        state.waker.register(cx.waker());

        // Now that we've registered, do the full check of our own internal
        // state. If we've fired the first bit is set, and if we've been
        // invalidated the second bit is set.
        match state.state.load(SeqCst) {
            n if n & 0b01 != 0 => Poll::Ready(()),
            n if n & 0b10 != 0 => panic!("timer has gone away"),
            _ => Poll::Pending,
        }
    }
}

impl Drop for NativeDelay {
    fn drop(&mut self) {
        let state = match self.state {
            Some(ref s) => s,
            None => return,
        };
        if let Some(timeouts) = state.inner.upgrade() {
            *state.at.lock().unwrap() = None;
            if timeouts.list.push(state).is_ok() {
                timeouts.waker.wake();
            }
        }
    }
}

impl fmt::Debug for NativeDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        f.debug_struct("Delay").finish()
    }
}

/// Whether `Delay::new` makes tokio timers inside a tokio runtime; see [`use_tokio_timers`].
static TOKIO_TIMERS: AtomicBool = AtomicBool::new(false);

/// Patched: from now on, a `Delay` created inside a tokio runtime is a tokio timer (an entry in
/// the runtime's timer wheel) instead of an entry of the helper thread's heap, whose every
/// creation and drop wakes that thread. Off by default. Turn it on only in a process whose tokio
/// runtimes all have their time driver enabled, never pause their clock, and never poll a timer
/// made in one runtime from another or after that runtime shut down (tokio's own `Sleep` rules):
/// a program that builds one runtime with `enable_all` and runs everything in it.
pub fn use_tokio_timers(enabled: bool) {
    TOKIO_TIMERS.store(enabled, SeqCst);
}

/// A future representing the notification that an elapsed duration has
/// occurred.
///
/// This is created through the `Delay::new` method indicating when the future should fire.
/// Note that these futures are not intended for high resolution timers, but rather they will
/// likely fire some granularity after the exact instant that they're otherwise indicated to fire
/// at.
///
/// Patched: after [`use_tokio_timers`]`(true)`, one created inside a tokio runtime is a tokio
/// timer; otherwise it is the original helper-thread timer.
pub struct Delay {
    inner: Inner,
}

enum Inner {
    Tokio(Pin<Box<tokio::time::Sleep>>),
    Native(NativeDelay),
}

impl Delay {
    /// Creates a new future which will fire at `dur` time into the future.
    #[inline]
    pub fn new(dur: Duration) -> Delay {
        let inner = if TOKIO_TIMERS.load(SeqCst) && tokio::runtime::Handle::try_current().is_ok() {
            Inner::Tokio(Box::pin(tokio::time::sleep(dur)))
        } else {
            Inner::Native(NativeDelay::new(dur))
        };
        Delay { inner }
    }

    /// Resets this timeout to an new timeout which will fire at the time
    /// specified by `at`.
    #[inline]
    pub fn reset(&mut self, dur: Duration) {
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().reset(tokio::time::Instant::now() + dur),
            Inner::Native(native) => native.reset(dur),
        }
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().inner {
            Inner::Tokio(sleep) => sleep.as_mut().poll(cx),
            Inner::Native(native) => Pin::new(native).poll(cx),
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        f.debug_struct("Delay").finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use std::thread::{self, Thread};

    struct Unpark(Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls `future` on this thread, parking between polls: no runtime around.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = Box::pin(future);
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            thread::park();
        }
    }

    #[test]
    fn inside_a_tokio_runtime_a_delay_is_a_tokio_timer_once_enabled() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            use_tokio_timers(false);
            assert!(matches!(Delay::new(Duration::from_millis(1)).inner, Inner::Native(_)), "off by default");
            use_tokio_timers(true);
            let started = Instant::now();
            let delay = Delay::new(Duration::from_millis(20));
            assert!(matches!(delay.inner, Inner::Tokio(_)));
            delay.await;
            assert!(started.elapsed() >= Duration::from_millis(20));
            let mut reset = Delay::new(Duration::from_secs(3_600));
            reset.reset(Duration::from_millis(5));
            reset.await;
        });
    }

    #[test]
    fn outside_a_runtime_a_delay_is_the_helper_thread_timer() {
        let started = Instant::now();
        let delay = Delay::new(Duration::from_millis(20));
        assert!(matches!(delay.inner, Inner::Native(_)));
        block_on(delay);
        assert!(started.elapsed() >= Duration::from_millis(20));
        let mut reset = Delay::new(Duration::from_secs(3_600));
        reset.reset(Duration::from_millis(5));
        block_on(reset);
    }
}
