//! Byte limits on what a peer cluster's API server sends us.
//!
//! A linked cluster's API server is not trusted: it could answer a list with a body of
//! gigabytes, or a watch with one endless event, and the client would buffer all of it
//! before parsing. [`BodyLimitLayer`] wraps a kube `Client`'s HTTP stack and fails a
//! response as soon as it goes over the limit: a whole body for ordinary requests, one
//! line (one event) for watches, whose body streams for minutes. The request then fails
//! with [`TooLarge`] in its error chain, like a broken connection: the link goes `Stale`
//! and keeps its last good MeshPeers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// The boxed error of kube's HTTP stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body of kube's HTTP stack (`kube::client::DynBody`, boxed).
pub type BoxBody = Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Unpin>;

/// Largest response body, or watch event, read from a remote API server: 16 MiB. The
/// API server's own limit on a request body is 3 MiB and a list page holds 500 objects
/// ([`crate::remote`]), so an honest answer stays far below it.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// A response went over its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TooLarge {
    /// The limit, in bytes.
    pub max: usize,
    /// Whether it was one watch event rather than a whole body.
    pub watch_event: bool,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.watch_event {
            "a watch event"
        } else {
            "a response body"
        };
        write!(
            f,
            "the remote API server sent {what} over {} MiB; refused (a hostile or broken server could exhaust our memory)",
            self.max >> 20
        )
    }
}

/// Limits every response body of the service it wraps to `max` bytes (per line for
/// watches).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: usize,
}

impl BodyLimitLayer {
    /// A limit of `max` bytes.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// See [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let watch = is_watch(request.uri());
        let max = self.max;
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Box::new(Limited::new(body, max, watch)) as BoxBody))
        })
    }
}

/// Whether the request is a watch (`?watch=true`), whose body is a stream of events, one
/// a line.
fn is_watch(uri: &Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// A body that fails once it has carried more than `max` bytes (since the last newline,
/// for a watch).
struct Limited {
    inner: BoxBody,
    max: usize,
    watch: bool,
    /// Bytes counted so far (of the current line, for a watch).
    seen: usize,
}

impl Limited {
    fn new(inner: BoxBody, max: usize, watch: bool) -> Self {
        Self {
            inner,
            max,
            watch,
            seen: 0,
        }
    }

    /// Counts `data`; an error once over the limit.
    fn count(&mut self, data: &[u8]) -> Result<(), TooLarge> {
        let too_large = TooLarge {
            max: self.max,
            watch_event: self.watch,
        };
        if !self.watch {
            self.seen = self.seen.saturating_add(data.len());
            return if self.seen > self.max {
                Err(too_large)
            } else {
                Ok(())
            };
        }
        let mut lines = data.split(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            self.seen = self.seen.saturating_add(line.len());
            if self.seen > self.max {
                return Err(too_large);
            }
            if lines.peek().is_some() {
                self.seen = 0;
            }
        }
        Ok(())
    }
}

impl Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.count(data)
                {
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_limited_as_a_whole_and_a_watch_per_event() {
        let mut body = Limited::new(empty(), 10, false);
        assert_eq!(body.count(b"12345\n"), Ok(()));
        assert_eq!(
            body.count(b"12345"),
            Err(TooLarge {
                max: 10,
                watch_event: false
            })
        );
        let mut watch = Limited::new(empty(), 10, true);
        for _ in 0..100 {
            assert_eq!(watch.count(b"123456789\n"), Ok(()));
        }
        // One event split across chunks counts as one.
        assert_eq!(watch.count(b"12345"), Ok(()));
        assert_eq!(watch.count(b"67890"), Ok(()));
        assert!(watch.count(b"1\n").is_err());
        assert!(
            TooLarge {
                max: MAX_RESPONSE_BYTES,
                watch_event: true
            }
            .to_string()
            .contains("a watch event over 16 MiB")
        );
        assert!(is_watch(&Uri::from_static(
            "/apis/wiremesh.io/v1alpha1/meshnodes?resourceVersion=1&watch=true"
        )));
        assert!(!is_watch(&Uri::from_static(
            "/apis/wiremesh.io/v1alpha1/meshnodes?limit=500"
        )));
    }

    struct Nothing;

    impl Body for Nothing {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(None)
        }
    }

    fn empty() -> BoxBody {
        Box::new(Nothing)
    }
}
