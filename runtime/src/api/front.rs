//! The front thread: every listener's accept loop runs on one thread of its own, at real-time
//! priority where the daemon may use it, so that `/healthz` is answered within a fraction of a
//! millisecond while the compute threads fill every core.
//!
//! Why a priority class and not niceness: under the kernel's fair scheduler a thread of
//! ordinary priority that has just run can be left waiting for the next tick (4 ms at 250 Hz)
//! behind a compute thread, however much lower that thread's niceness. Measured on two cores
//! under 128 streams: `/healthz` p99 3.5-4.5 ms with the listeners on the main runtime, 0.3 ms
//! from here (`accelctl bench --probe-health`, whose probe thread is real-time as well).
//!
//! Only bounded work runs here: accepting, and looking at a new connection's first bytes. A
//! connection that asks for `/healthz` is served here; any other is moved to the main runtime
//! (ordinary priority) as its first bytes arrive, and speaks HTTP there with no hop per
//! request. Should a connection served here go on to ask for something else, that request's
//! handler, and the frames of a streamed body, run on the main runtime and only the bytes pass
//! through here: no client can make this thread compute on its behalf, so the kernel's
//! real-time throttling is never what bounds it.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

use super::server::{self, Acceptor, ConnectionLimits, IsOperator};

/// Frames of a streamed body in flight between the main runtime and the front thread.
const FRAMES_IN_FLIGHT: usize = 8;

/// The front thread and its single-threaded runtime; stopped and joined when dropped.
#[derive(Debug)]
pub struct Front {
    runtime: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Front {
    /// Starts the thread. A daemon that may not use real-time priority (no `CAP_SYS_NICE`, or
    /// no real-time budget in its cgroup) serves from it at ordinary priority, and says so.
    pub fn start() -> std::io::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("api-front".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let priority = crate::sys::realtime_thread();
                if ready_tx
                    .send(Ok((runtime.handle().clone(), priority)))
                    .is_ok()
                {
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                }
                // What is still on the runtime (connections past the drain) is dropped here.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        let (runtime, priority) = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the API front thread ended as it started"))??;
        match priority {
            Ok(()) => tracing::info!("API front thread at real-time priority (SCHED_FIFO 1)"),
            Err(e) => tracing::warn!(
                error = %e,
                "API front thread at ordinary priority (real-time refused); /healthz can wait milliseconds behind compute under load"
            ),
        }
        Ok(Self {
            runtime,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Serves `router` on `listener` from the front thread (see [`server::serve`]); requests
    /// other than `/healthz` are served on the runtime this is called from. The handle answers whether every connection
    /// drained.
    pub fn serve<A: Acceptor>(
        &self,
        listener: A,
        router: Router,
        stop: watch::Receiver<bool>,
        drain: Duration,
        limits: ConnectionLimits,
        is_operator: IsOperator<A::Peer>,
    ) -> std::io::Result<tokio::task::JoinHandle<bool>> {
        // A listener answers to the runtime it was registered with: moved over as a plain
        // socket and registered again there.
        let plain = listener.into_std()?;
        let main = Handle::current();
        Ok(self.runtime.spawn(async move {
            match A::from_std(plain) {
                Ok(listener) => {
                    server::serve(listener, router, main, stop, drain, limits, is_operator).await
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot move a listener to the API front thread");
                    false
                }
            }
        }))
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request on a connection served here: `/healthz` in place, anything else by its
/// handler on `main`, whose streamed body is produced there too and only carried here.
pub async fn dispatch<B>(
    main: &Handle,
    router: Router,
    request: Request<B>,
) -> Result<Response, Infallible>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    if request.method() == Method::GET && request.uri().path() == "/healthz" {
        return router.oneshot(request).await;
    }
    let handler = main.spawn(async move {
        let Ok(response) = router.oneshot(request).await;
        hand_over(response)
    });
    // A client that leaves mid-request ends its handler, as it would on the same runtime:
    // what the handler holds (a queued or running generation) is cancelled with it.
    let _abort = AbortOnDrop(handler.abort_handle());
    match handler.await {
        Ok(response) => Ok(response),
        // A handler that panicked ends its own request only.
        Err(e) => {
            tracing::error!(error = %e, "a request handler failed");
            Ok((
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(serde_json::json!({"error": {
                    "code": "internal",
                    "message": "the request's handler failed; see the daemon log"
                }})),
            )
                .into_response())
        }
    }
}

/// Aborts a spawned task when dropped (a no-op once it has finished).
pub(super) struct AbortOnDrop(pub(super) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Leaves a body of known length as it is (its frames are ready bytes), and moves the
/// production of any other (a stream of events) to a task on the current runtime that
/// hands each frame over a short channel. The task ends, and drops the body with whatever
/// it holds (a running generation), as soon as the connection lets go of the response.
fn hand_over(response: Response) -> Response {
    if hyper::body::Body::size_hint(response.body())
        .exact()
        .is_some()
    {
        return response;
    }
    let (parts, mut body) = response.into_parts();
    let (frames, received) = mpsc::channel::<Result<Frame<Bytes>, axum::Error>>(FRAMES_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = frames.closed() => return,
            };
            let Some(frame) = frame else { return };
            let failed = frame.is_err();
            if frames.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    let carried = futures_util::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|frame| (frame, received))
    });
    Response::from_parts(parts, Body::new(http_body_util::StreamBody::new(carried)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_of_known_length_is_left_alone_and_a_stream_is_carried_whole() {
        let full = hand_over(Response::new(Body::from("whole")));
        assert_eq!(hyper::body::Body::size_hint(full.body()).exact(), Some(5));

        let parts = ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"];
        let stream = futures_util::stream::iter(parts.map(|p| Ok::<_, Infallible>(Bytes::from(p))));
        let carried = hand_over(Response::new(Body::from_stream(stream)));
        assert_eq!(hyper::body::Body::size_hint(carried.body()).exact(), None);
        let bytes = carried.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, parts.concat().as_bytes());
    }

    /// Sends `()` when dropped.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn a_request_dropped_mid_handler_ends_its_handler() {
        let (tx, dropped) = tokio::sync::oneshot::channel();
        let guard = std::sync::Arc::new(std::sync::Mutex::new(Some(Dropped(Some(tx)))));
        let router = Router::new().route(
            "/slow",
            axum::routing::get(move || {
                let held = guard.lock().unwrap().take();
                async move {
                    std::future::pending::<()>().await;
                    drop(held);
                }
            }),
        );
        let request = Request::get("/slow").body(Body::empty()).unwrap();
        let main = Handle::current();
        let waiting = tokio::spawn(async move { dispatch(&main, router, request).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiting.abort(); // the connection went away
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the handler outlived its request")
            .unwrap();
    }

    #[tokio::test]
    async fn a_handler_that_panics_fails_its_request_with_a_500() {
        let router = Router::new().route(
            "/boom",
            axum::routing::get(|| async {
                if std::hint::black_box(true) {
                    panic!("handler bug");
                }
                "unreached"
            }),
        );
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let Ok(response) = dispatch(&Handle::current(), router, request).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn dropping_the_carried_body_drops_the_stream_it_came_from() {
        let (tx, dropped) = tokio::sync::oneshot::channel();
        // A stream that yields once and then waits, like a generation between tokens.
        let stream =
            futures_util::stream::unfold((Dropped(Some(tx)), true), |(guard, first)| async move {
                if first {
                    return Some((
                        Ok::<_, Infallible>(Bytes::from("data: a\n\n")),
                        (guard, false),
                    ));
                }
                std::future::pending::<()>().await;
                drop(guard);
                None
            });
        let mut body = hand_over(Response::new(Body::from_stream(stream))).into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "data: a\n\n");
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the stream outlived its connection")
            .unwrap();
    }
}
