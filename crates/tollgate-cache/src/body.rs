//! The response body: a cached body, or the origin's body passing through
//! (and recorded for the store when the response may be stored).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::flow::Recorder;

pin_project! {
    /// The body of a response that went through
    /// [`ResponseCache`](crate::ResponseCache): either served from the cache,
    /// or the origin's body streamed through untouched (and copied, up to the
    /// size cap, when the response is being stored).
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Cached { data: Option<Bytes> },
        Origin {
            #[pin]
            body: B,
            recorder: Option<Recorder>,
        },
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn cached(data: Bytes) -> Self {
        CacheBody {
            kind: Kind::Cached {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        CacheBody {
            kind: Kind::Cached { data: None },
        }
    }

    /// A body that did not go through the cache (a stack without the cache
    /// layer keeps the same body type this way).
    pub fn passthrough(body: B) -> Self {
        Self::origin(body)
    }

    pub(crate) fn origin(body: B) -> Self {
        CacheBody {
            kind: Kind::Origin {
                body,
                recorder: None,
            },
        }
    }

    pub(crate) fn recording(body: B, recorder: Recorder) -> Self
    where
        B: Body,
    {
        // A body that has ended already (a 204, an empty 200, most
        // redirects) is never polled: servers see `is_end_stream` and drop
        // it with the head. Its recording is complete now.
        if body.is_end_stream() {
            recorder.finish();
            return Self::origin(body);
        }
        CacheBody {
            kind: Kind::Origin {
                body,
                recorder: Some(recorder),
            },
        }
    }
}

/// A complete body (what outer layers build their 429s and 503s from).
impl<B> From<Bytes> for CacheBody<B> {
    fn from(data: Bytes) -> Self {
        Self::cached(data)
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Cached { .. } => "cached",
            Kind::Origin {
                recorder: Some(_), ..
            } => "origin (recording)",
            Kind::Origin { .. } => "origin",
        };
        f.debug_struct("CacheBody").field("kind", &kind).finish()
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Cached { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Origin { mut body, recorder } => {
                let frame = match ready!(body.as_mut().poll_frame(cx)) {
                    None => {
                        if let Some(r) = recorder.take() {
                            r.finish();
                        }
                        return Poll::Ready(None);
                    }
                    Some(Err(e)) => {
                        // A failing body is never stored.
                        *recorder = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Some(Ok(frame)) => frame.map_data(|mut d| d.copy_to_bytes(d.remaining())),
                };
                match frame.data_ref() {
                    Some(data) => {
                        if let Some(r) = recorder.as_mut()
                            && !r.push(data)
                        {
                            *recorder = None;
                        }
                    }
                    // Trailers are not stored: such a response is not either.
                    None => *recorder = None,
                }
                // Servers may stop polling once the body says it ended.
                if body.is_end_stream()
                    && let Some(r) = recorder.take()
                {
                    r.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Cached { data } => data.is_none(),
            Kind::Origin { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Cached { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Origin { body, .. } => body.size_hint(),
        }
    }
}

/// A body buffer with a cap.
#[derive(Debug)]
pub(crate) struct Capped {
    pub buf: BytesMut,
    pub cap: usize,
}

impl Capped {
    /// Appends; false when the cap is passed.
    pub(crate) fn push(&mut self, data: &Bytes) -> bool {
        if self.buf.len() + data.len() > self.cap {
            return false;
        }
        self.buf.extend_from_slice(data);
        true
    }
}
