//! The HTTP client side of the control API: one request per connection over the Unix socket.
//!
//! Turns transport failures into the few cases an operator acts on differently: the daemon is
//! not running, the socket is not ours to use, or the daemon answered with an error.

use std::path::{Path, PathBuf};

use accel_runtime::api::types::{ErrorBody, ErrorDetail};
use accel_runtime::api::ACT_FOR_TENANT_HEADER;
use accel_runtime::yaml::Problems;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Why a command failed; `main` maps each to an exit code.
#[derive(Debug)]
pub enum CtlError {
    /// No daemon listens on the socket.
    NotRunning { socket: PathBuf, reason: String },
    /// The socket exists but we may not connect (group or mode).
    SocketDenied { socket: PathBuf },
    /// The daemon answered with an error.
    Api {
        status: StatusCode,
        detail: ErrorDetail,
    },
    /// A policy file is invalid (`policy check`).
    InvalidPolicy(Problems),
    /// The command line asks for something impossible.
    Usage(String),
    /// Anything else: a broken connection, an unexpected answer.
    Other(String),
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::NotRunning { socket, reason } => write!(
                f,
                "cannot reach acceld at {} ({reason}); is it running? Start it with `systemctl start acceld` or `acceld`, or point --socket / ACCEL_SOCKET at its socket",
                socket.display()
            ),
            CtlError::SocketDenied { socket } => write!(
                f,
                "permission denied on {}; run as root or as a member of the socket's group",
                socket.display()
            ),
            CtlError::Api { status, detail } => {
                write!(f, "{} ({}): {}", detail.code, status.as_u16(), detail.message)?;
                for problem in &detail.problems {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
            CtlError::InvalidPolicy(problems) => write!(f, "invalid policy: {problems}"),
            CtlError::Usage(message) | CtlError::Other(message) => f.write_str(message),
        }
    }
}

/// A connection target and the identity options every request carries.
#[derive(Debug, Clone)]
pub struct Client {
    pub socket: PathBuf,
    /// Act for this tenant (operators only).
    pub tenant: Option<String>,
}

impl Client {
    /// Sends one request and returns the status and body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), CtlError> {
        let response = self
            .send(method, path, body.map(|b| (b, "application/json")), None)
            .await?;
        whole_answer(path, response).await
    }

    /// POSTs `body` with its content type and returns the status and body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Result<(StatusCode, Bytes), CtlError> {
        let response = self
            .send(Method::POST, path, Some((body, content_type)), None)
            .await?;
        whole_answer(path, response).await
    }

    /// GETs `path` and copies the body to `out` as it arrives (for answers too large to hold).
    pub async fn get_to(&self, path: &str, out: &mut impl std::io::Write) -> Result<(), CtlError> {
        let response = self.send(Method::GET, path, None, None).await?;
        if !response.status().is_success() {
            return whole_answer(path, response).await.map(drop);
        }
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| CtlError::Other(format!("the answer from acceld broke: {e}")))?;
            if let Some(data) = frame.data_ref() {
                out.write_all(data)
                    .map_err(|e| CtlError::Other(format!("cannot write the output: {e}")))?;
            }
        }
        out.flush()
            .map_err(|e| CtlError::Other(format!("cannot write the output: {e}")))
    }

    /// One request over the socket, with the caller's identity headers; `accept` names the
    /// answer's type when it matters (server-sent events).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &'static str)>,
        accept: Option<&'static str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CtlError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect_error(&self.socket, e))?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(
                hyper::header::USER_AGENT,
                concat!("accelctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(tenant) = &self.tenant {
            builder = builder.header(ACT_FOR_TENANT_HEADER, tenant);
        }
        if let Some(accept) = accept {
            builder = builder.header(hyper::header::ACCEPT, accept);
        }
        let body = match body {
            Some((bytes, content_type)) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CtlError::Other(format!("cannot build request for {path}: {e}")))?;
        exchange(TokioIo::new(stream), request)
            .await
            .map_err(|e| CtlError::Other(format!("request {path} failed: {e}")))
    }

    /// POSTs `body` to a streaming endpoint and calls `on_data` with each server-sent event's
    /// data as it arrives.
    pub async fn post_sse(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        mut on_data: impl FnMut(&str) -> Result<(), CtlError>,
    ) -> Result<(), CtlError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| CtlError::Other(format!("cannot encode request: {e}")))?;
        let response = self
            .send(
                Method::POST,
                path,
                Some((body, "application/json")),
                Some("text/event-stream"),
            )
            .await?;
        if !response.status().is_success() {
            return whole_answer(path, response).await.map(drop);
        }
        let mut body = response.into_body();
        let mut events = SseData::default();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| CtlError::Other(format!("the stream from acceld broke: {e}")))?;
            if let Some(data) = frame.data_ref() {
                for event in events.push(data) {
                    on_data(&event)?;
                }
            }
        }
        Ok(())
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, serde_json::Value), CtlError> {
        let (_, bytes) = self.request(Method::GET, path, None).await?;
        decode(path, &bytes)
    }

    /// POSTs a JSON body to `path` and decodes the JSON answer.
    pub async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(T, serde_json::Value), CtlError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| CtlError::Other(format!("cannot encode request: {e}")))?;
        let (_, bytes) = self.request(Method::POST, path, Some(body)).await?;
        decode(path, &bytes)
    }

    /// DELETEs `path` and decodes the JSON answer.
    pub async fn delete_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, serde_json::Value), CtlError> {
        let (_, bytes) = self.request(Method::DELETE, path, None).await?;
        decode(path, &bytes)
    }
}

/// Sends one request on a new connection (a Unix socket or TCP stream) and returns the
/// answer's head, its body still to read.
pub async fn exchange<IO>(
    io: IO,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with acceld failed: {e}"))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Splits a server-sent event stream into its events' data, across the frames it comes in.
#[derive(Debug, Default)]
pub struct SseData {
    /// An event not yet ended by its blank line.
    pending: Vec<u8>,
}

impl SseData {
    /// Adds a frame; returns the `data:` of every event it completed, in order.
    pub fn push(&mut self, frame: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(frame);
        let mut data = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.trim_start().to_owned());
                }
            }
        }
        data
    }
}

/// Reads a whole answer: its status and body on success, the daemon's error otherwise.
pub async fn whole_answer(
    path: &str,
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<(StatusCode, Bytes), CtlError> {
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CtlError::Other(format!("reading the answer to {path} failed: {e}")))?
        .to_bytes();
    if status.is_success() {
        Ok((status, bytes))
    } else {
        Err(api_error(status, &bytes))
    }
}

/// Decodes a JSON answer into both its typed form and a raw value (for `--json`).
fn decode<T: serde::de::DeserializeOwned>(
    path: &str,
    bytes: &[u8],
) -> Result<(T, serde_json::Value), CtlError> {
    let raw: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| CtlError::Other(format!("acceld sent invalid JSON for {path}: {e}")))?;
    let typed = serde_json::from_value(raw.clone()).map_err(|e| {
        CtlError::Other(format!(
            "unexpected answer for {path} (daemon and accelctl versions differ?): {e}"
        ))
    })?;
    Ok((typed, raw))
}

fn connect_error(socket: &Path, e: std::io::Error) -> CtlError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => CtlError::SocketDenied {
            socket: socket.to_owned(),
        },
        _ => CtlError::NotRunning {
            socket: socket.to_owned(),
            reason: e.to_string(),
        },
    }
}

fn api_error(status: StatusCode, bytes: &[u8]) -> CtlError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => CtlError::Api {
            status,
            detail: body.error,
        },
        Err(_) => CtlError::Api {
            status,
            detail: ErrorDetail {
                code: "http_error".into(),
                message: String::from_utf8_lossy(bytes).trim().to_owned(),
                problems: Vec::new(),
            },
        },
    }
}
