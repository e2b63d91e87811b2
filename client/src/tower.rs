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
//! Service graph: the client layer records each call with its callee as peer (the name given
//! to [`TailscopeClientLayer::peer`], else the request's host) and tells the callee who calls
//! it in W3C `baggage` (`ts.caller=<service>`, other members kept); the server layer records
//! the request with that caller as peer. So an edge is seen from both ends — the time the
//! caller waited and the time the callee served — with exact counts. A client names at most
//! [`MAX_PEERS`](crate::MAX_PEERS) peers; beyond, new callers count as `__overflow__`.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # fn demo(client: tailscope::Client) {
//! let app: axum::Router = axum::Router::new()
//!     .route("/users/{id}", axum::routing::get(|| async { "hi" }))
//!     .layer(tailscope::tower::TailscopeLayer::new(client));
//! # }
//! ```

use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tailscope_proto::selftime::Calls;

use crate::trace::{baggage_get, baggage_set, TraceContext, CALLER_KEY};
use crate::{Client, Own, SpanKind, Status, MAX_OPERATION_BYTES};

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
        TailscopeService { inner, client: self.client.clone(), side: Side::Server }
    }
}

/// A service whose requests are timed: the requests it serves (from [`TailscopeLayer`]), or
/// the calls it makes (from [`TailscopeClientLayer`]).
#[derive(Debug, Clone)]
pub struct TailscopeService<S> {
    inner: S,
    client: Client,
    side: Side,
}

/// Which end of a call a [`TailscopeService`] times.
#[derive(Debug, Clone)]
enum Side {
    /// Requests served: `SPAN_KIND_SERVER`, the caller its `baggage` names as peer.
    Server,
    /// Calls made: `SPAN_KIND_CLIENT`.
    Client {
        /// The callee, when the layer was told it; else the request's host.
        peer: Option<Arc<str>>,
        /// `ts.caller=<this service>`, what a request without `baggage` gets.
        caller: http::HeaderValue,
    },
}

thread_local! {
    /// Where operation names are assembled, so naming a request allocates nothing.
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

fn operation<B>(client: &Client, req: &http::Request<B>, kind: SpanKind, peer: &str) -> u32 {
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
        client.operation_id_with_peer(name, kind, peer)
    })
}

/// The caller the request's W3C `baggage` names ([`CALLER_KEY`]), if any and if it is a name
/// the server would take.
fn caller<B>(req: &http::Request<B>) -> Option<Cow<'_, str>> {
    req.headers()
        .get_all("baggage")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| baggage_get(v, CALLER_KEY))
        .filter(|c| !c.is_empty() && c.len() <= MAX_OPERATION_BYTES)
}

/// Sets `ts.caller` in the request's `baggage`, keeping what else it carries.
fn tell_caller<B>(req: &mut http::Request<B>, caller: &http::HeaderValue, service: &str) {
    let headers = req.headers_mut();
    let existing: Vec<&str> = headers.get_all("baggage").iter().filter_map(|v| v.to_str().ok()).collect();
    if existing.is_empty() {
        headers.insert("baggage", caller.clone());
        return;
    }
    let merged = baggage_set(&existing.join(","), CALLER_KEY, service);
    if let Some(value) = merged.and_then(|m| http::HeaderValue::from_str(&m).ok()) {
        headers.insert("baggage", value);
    }
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
        let (op, ctx, parent) = match &self.side {
            Side::Client { peer, caller } => {
                // A call: child of the request being served, and its callee's parent.
                let callee = peer.as_deref().or_else(|| req.uri().host()).unwrap_or("");
                let op = operation(&self.client, &req, SpanKind::Client, callee);
                let parent = req.extensions().get::<TraceContext>().copied().or_else(TraceContext::current);
                let ctx = parent.map_or_else(TraceContext::root, |p| p.child(0));
                if let Ok(value) = http::HeaderValue::from_str(&ctx.traceparent()) {
                    req.headers_mut().insert("traceparent", value);
                }
                tell_caller(&mut req, caller, &self.client.config().service);
                (op, ctx, parent)
            }
            Side::Server => {
                // A request served: child of its caller's `traceparent`, its peer the caller.
                let op = {
                    let caller = caller(&req);
                    operation(&self.client, &req, SpanKind::Server, caller.as_deref().unwrap_or(""))
                };
                let parent = traceparent(&req);
                let ctx = parent.map_or_else(TraceContext::root, |p| p.child(0));
                req.extensions_mut().insert(ctx);
                (op, ctx, parent)
            }
        };
        let timer = Timer {
            client: self.client.clone(),
            op,
            started: Instant::now(),
            done: false,
            ids: ctx.ids(parent.as_ref()),
            calls: matches!(self.side, Side::Server).then(Calls::new),
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
    peer: Option<Arc<str>>,
    caller: http::HeaderValue,
}

impl TailscopeClientLayer {
    /// A layer recording calls into `client`; the callee of each call is the request's host
    /// (see [`TailscopeClientLayer::peer`]).
    pub fn new(client: Client) -> TailscopeClientLayer {
        let service = &client.config().service;
        let caller = baggage_set("", CALLER_KEY, service)
            .and_then(|b| http::HeaderValue::from_str(&b).ok())
            .unwrap_or_else(|| http::HeaderValue::from_static(""));
        TailscopeClientLayer { client, peer: None, caller }
    }

    /// Names the service these calls reach, by its own `service` name (`payments`), or an
    /// uninstrumented system (`ext:api.stripe.com`): the peer of the calls' series and the
    /// callee of their edge in the service graph. Without it, the request's host is the peer
    /// — a tonic channel's requests carry none until the channel adds it, so name the peer
    /// there.
    pub fn peer(mut self, peer: impl Into<Arc<str>>) -> TailscopeClientLayer {
        self.peer = Some(peer.into());
        self
    }
}

impl<S> tower_layer::Layer<S> for TailscopeClientLayer {
    type Service = TailscopeClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let side = Side::Client { peer: self.peer.clone(), caller: self.caller.clone() };
        TailscopeService { inner, client: self.client.clone(), side }
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
    /// For a request served, the calls its handler made so far (`None`: it times a call made).
    calls: Option<Calls>,
}

impl Timer {
    fn finish(&mut self, status: Status) {
        if !self.done {
            self.done = true;
            let own = self.calls.as_ref().map_or(Own::Call, Own::Made);
            self.client.record_op_since_ids(self.op, self.started, status, self.ids, own);
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
            // A request's handler: the calls that end while it runs are its own.
            let before = this.timer.calls.map(crate::calls::enter);
            let polled = this.inner.poll(cx);
            if let Some(before) = before {
                this.timer.calls = Some(crate::calls::leave(before));
            }
            std::task::ready!(polled)
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
