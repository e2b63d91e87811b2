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

use crate::{Client, Status};

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
        TailscopeService { inner, client: self.client.clone() }
    }
}

/// A service whose requests are timed.
#[derive(Debug, Clone)]
pub struct TailscopeService<S> {
    inner: S,
    client: Client,
}

thread_local! {
    /// Where operation names are assembled, so naming a request allocates nothing.
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

fn operation<B>(client: &Client, req: &http::Request<B>) -> u32 {
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
        client.operation_id(name, crate::SpanKind::Server)
    })
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

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let op = operation(&self.client, &req);
        let timer = Timer { client: self.client.clone(), op, started: Instant::now(), done: false };
        ResponseFuture { inner: self.inner.call(req), timer }
    }
}

/// Records the request when it completes, or as failed when dropped before.
#[derive(Debug)]
struct Timer {
    client: Client,
    op: u32,
    started: Instant,
    done: bool,
}

impl Timer {
    fn finish(&mut self, status: Status) {
        if !self.done {
            self.done = true;
            self.client.record_op_since(self.op, self.started, status);
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.finish(Status::Error);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TailscopeService`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        timer: Timer,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
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
