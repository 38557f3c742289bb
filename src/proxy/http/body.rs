//! A body passed through unchanged but for a look at each frame: how svidcar cleans
//! request trailers and keeps a request counted in flight until its response has been
//! sent. Unlike `BodyExt::map_frame`, it keeps the size hint, so a response of known
//! length still goes out with `Content-Length`, not chunked.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

/// `inner`, with `f` called on each frame.
pub struct Inspect<B, F> {
    inner: B,
    f: F,
}

impl<B, F> Inspect<B, F> {
    pub fn new(inner: B, f: F) -> Self {
        Self { inner, f }
    }
}

impl<B, F> Body for Inspect<B, F>
where
    B: Body + Unpin,
    F: FnMut(&mut Frame<B::Data>) + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                (this.f)(&mut frame);
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
