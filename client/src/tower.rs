//! A `tower::Layer` that times every request of the service it wraps (axum, tonic, hyper — any
//! tower service over `http` requests) and records it under `"{METHOD} {route}"`.
//!
//! With the `axum` feature and the layer added with `Router::layer`, the route is axum's
//! matched path (`GET /users/{id}`), so ids in paths do not become operations; otherwise it is
//! the request path (tonic's `/package.Service/Method` is already low-cardinality). Past
//! `max_operations` names, new ones count as `__overflow__`.
//!
//! A request fails when the response is a 5xx, when it carries a non-zero `grpc-status`, when
//! the service returns an error, or when it is dropped before completing.
//!
//! Trace context: [`TailscopeLayer`] reads the request's W3C `traceparent` (a new trace when it
//! has none or an invalid one), records its `SPAN_KIND_SERVER` span in that trace, puts the
//! span's [`TraceContext`] in the request's extensions and makes it current while the inner
//! service runs. [`TailscopeClientLayer`], on the calls a service makes (a tonic or hyper
//! client), records a `SPAN_KIND_CLIENT` span, child of the context in the request's
//! extensions or else the current one, and writes its `traceparent` into the request — so the
//! callee's server span is its child, and a caller behind two tailscope layers passes its trace
//! on without a line of code.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # fn demo(client: tailscope::Client) {
//! let app: axum::Router = axum::Router::new()
//!     .route("/users/{id}", axum::routing::get(|| async { "hi" }))
//!     .layer(tailscope::tower::TailscopeLayer::new(client));
//! # }
//! ```

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::trace::TraceContext;
use crate::{Client, SpanKind, Status};

/// Wraps services in [`TailscopeService`].
#[derive(Debug, Clone)]
pub struct TailscopeLayer {
    client: Client,
}

impl TailscopeLayer {
    /// A layer recording into `client`.
    pub fn new(client: Client) -> TailscopeLayer {
        TailscopeLayer { client }
    }
}

impl<S> tower_layer::Layer<S> for TailscopeLayer {
    type Service = TailscopeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TailscopeService { inner, client: self.client.clone(), kind: SpanKind::Server }
    }
}

/// A service whose requests are timed: the requests it serves (from [`TailscopeLayer`]), or
/// the calls it makes (from [`TailscopeClientLayer`]).
#[derive(Debug, Clone)]
pub struct TailscopeService<S> {
    inner: S,
    client: Client,
    /// `Server` for requests served, `Client` for calls made.
    kind: SpanKind,
}

thread_local! {
    /// Where operation names are assembled, so naming a request allocates nothing.
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

fn operation<B>(client: &Client, req: &http::Request<B>, kind: SpanKind) -> u32 {
    #[cfg(feature = "axum")]
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str());
    #[cfg(not(feature = "axum"))]
    let route: Option<&str> = None;
    let route = route.unwrap_or_else(|| req.uri().path());
    NAME.with_borrow_mut(|name| {
        name.clear();
        name.push_str(req.method().as_str());
        name.push(' ');
        name.push_str(route);
        client.operation_id(name, kind)
    })
}

/// The trace context a request's `traceparent` header names, if valid.
fn traceparent<B>(req: &http::Request<B>) -> Option<TraceContext> {
    req.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse)
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for TailscopeService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let op = operation(&self.client, &req, self.kind);
        let (ctx, parent) = if self.kind == SpanKind::Client {
            // A call: child of the request being served, and its callee's parent.
            let parent = req.extensions().get::<TraceContext>().copied().or_else(TraceContext::current);
            let ctx = parent.map_or_else(TraceContext::root, |p| p.child(0));
            if let Ok(value) = http::HeaderValue::from_str(&ctx.traceparent()) {
                req.headers_mut().insert("traceparent", value);
            }
            (ctx, parent)
        } else {
            // A request served: child of its caller's `traceparent`.
            let parent = traceparent(&req);
            let ctx = parent.map_or_else(TraceContext::root, |p| p.child(0));
            req.extensions_mut().insert(ctx);
            (ctx, parent)
        };
        let timer = Timer {
            client: self.client.clone(),
            op,
            started: Instant::now(),
            done: false,
            ids: ctx.ids(parent.as_ref()),
        };
        let inner = {
            let _current = TraceContext::enter(ctx);
            self.inner.call(req)
        };
        ResponseFuture { inner, timer, ctx }
    }
}

/// Wraps the clients a service calls others with in [`TailscopeClientService`].
#[derive(Debug, Clone)]
pub struct TailscopeClientLayer {
    client: Client,
}

impl TailscopeClientLayer {
    /// A layer recording calls into `client`.
    pub fn new(client: Client) -> TailscopeClientLayer {
        TailscopeClientLayer { client }
    }
}

impl<S> tower_layer::Layer<S> for TailscopeClientLayer {
    type Service = TailscopeClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TailscopeService { inner, client: self.client.clone(), kind: SpanKind::Client }
    }
}

/// A client whose calls are timed as `SPAN_KIND_CLIENT` spans under `"{METHOD} {path}"` (a
/// tonic client's paths are its methods) and carry `traceparent`.
pub type TailscopeClientService<S> = TailscopeService<S>;

/// Records the request when it completes, or as failed when dropped before.
#[derive(Debug)]
struct Timer {
    client: Client,
    op: u32,
    started: Instant,
    done: bool,
    ids: crate::Ids,
}

impl Timer {
    fn finish(&mut self, status: Status) {
        if !self.done {
            self.done = true;
            self.client.record_op_since_ids(self.op, self.started, status, self.ids);
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.finish(Status::Error);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TailscopeService`]; the
    /// request's trace context is current while it is polled.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        timer: Timer,
        ctx: TraceContext,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = {
            let _current = TraceContext::enter(*this.ctx);
            std::task::ready!(this.inner.poll(cx))
        };
        let failed = match &out {
            Ok(resp) => {
                resp.status().is_server_error()
                    || resp.headers().get("grpc-status").is_some_and(|s| s.as_bytes() != b"0")
            }
            Err(_) => true,
        };
        this.timer.finish(if failed { Status::Error } else { Status::Ok });
        Poll::Ready(out)
    }
}
