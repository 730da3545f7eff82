//! Chat templates rendered in a process of their own (`acceld render`): a template comes with
//! a third-party model file, and fuel and an output cap do not bound the memory a template
//! can take (a string doubled in a loop or a recursive macro grows to gigabytes in a few dozen
//! instructions). The renderer runs as the workers' user with its address space limited to
//! [`RENDER_MEMORY`]; a template that goes past it kills only the renderer, and the request
//! gets a 400 naming the limit.
//!
//! A small pool of renderers per model is kept warm; each renders one request at a time.

use std::os::fd::FromRawFd as _;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::proto::Deadline;
use super::proto::{self, tag};
use super::remote::{launch, Connection};
use super::{WorkerIdentity, SOCKET_FD};
use crate::chat::{ChatInput, ChatTemplate, TemplateError};

/// Address space of a renderer: the binary, its libraries and the renderer's heap. Prompts
/// are capped at a few MiB; a template needing more than this is broken or hostile.
pub const RENDER_MEMORY: u64 = 1 << 30;
/// Longest one rendering may take.
pub const RENDER_DEADLINE: Duration = Duration::from_secs(2);
/// Renderers kept idle per model.
const IDLE: usize = 4;

/// `acceld render`: renders with the template it is sent, one request at a time.
pub fn main() -> Result<(), String> {
    // SAFETY: the parent placed our end of its socket pair at this descriptor.
    let mut stream = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    // SAFETY: a plain prctl on this process.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let source = proto::read_frame(&mut stream)
        .and_then(|f| f.expect(tag::INIT))
        .map_err(|e| e.to_string())?;
    let source = String::from_utf8(source).map_err(|_| "the template is not UTF-8".to_owned())?;
    let template = ChatTemplate::new(&source).map_err(|e| e.to_string())?;
    loop {
        let frame = match proto::read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(proto::ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e.to_string()),
        };
        if frame.tag == tag::SHUTDOWN {
            return Ok(());
        }
        let reply = serde_json::from_slice::<ChatInput>(&frame.payload)
            .map_err(|e| TemplateError::new(format!("malformed render request: {e}")))
            .and_then(|input| template.render_here(&input));
        let written = match reply {
            Ok(text) => proto::write_frame(&mut stream, tag::RENDERED, text.as_bytes()),
            Err(e) => proto::write_frame(&mut stream, tag::ERROR, e.to_string().as_bytes()),
        };
        written.map_err(|e| e.to_string())?;
    }
}

/// Renderer processes for one model's template.
#[derive(Debug)]
pub struct TemplateSandbox {
    source: String,
    identity: WorkerIdentity,
    idle: Mutex<Vec<Connection>>,
}

impl TemplateSandbox {
    pub fn new(source: &str, identity: WorkerIdentity) -> Self {
        Self {
            source: source.to_owned(),
            identity,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn start(&self) -> Result<Connection, TemplateError> {
        let (child, mut stream) = launch(&self.identity, "render", Some(RENDER_MEMORY))
            .map_err(|e| TemplateError::new(format!("cannot start the template renderer: {e}")))?;
        let connection = Connection {
            child,
            stream: stream
                .try_clone()
                .map_err(|e| TemplateError::new(e.to_string()))?,
        };
        proto::write_frame(&mut stream, tag::INIT, self.source.as_bytes())
            .map_err(|e| TemplateError::new(format!("cannot start the template renderer: {e}")))?;
        stream
            .set_write_timeout(Some(RENDER_DEADLINE))
            .map_err(|e| TemplateError::new(e.to_string()))?;
        Ok(connection)
    }

    /// Renders in a renderer process: the same result as in this process, except that a
    /// template that takes too much memory or time ends its renderer, not the daemon.
    pub fn render(&self, input: &ChatInput) -> Result<String, TemplateError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut renderer = match idle {
            Some(renderer) => renderer,
            None => self.start()?,
        };
        let request = serde_json::to_vec(input).map_err(|e| TemplateError::new(e.to_string()))?;
        let deadline = Instant::now() + RENDER_DEADLINE;
        let answer = proto::write_frame(&mut renderer.stream, tag::RENDER, &request)
            .and_then(|()| proto::read_frame(&mut Deadline::new(&renderer.stream, deadline)));
        let result = match answer {
            Ok(frame) if frame.tag == tag::RENDERED => String::from_utf8(frame.payload)
                .map_err(|_| TemplateError::new("the rendered prompt is not UTF-8".into())),
            Ok(frame) if frame.tag == tag::ERROR => {
                let text = String::from_utf8_lossy(&frame.payload);
                // Its own message already starts "chat template: ".
                let text = text.strip_prefix("chat template: ").unwrap_or(&text);
                Err(TemplateError::new(text.chars().take(1024).collect()))
            }
            Ok(other) => Err(TemplateError::new(format!(
                "the template renderer answered {:#04x}",
                other.tag
            ))),
            Err(proto::ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(TemplateError::new(format!(
                    "the model's chat template took longer than {}s to render; shorten the conversation or ask an operator to fix the template",
                    RENDER_DEADLINE.as_secs()
                )));
            }
            Err(_) => {
                // The renderer died mid-render: the kernel refused it memory (or it crashed).
                return Err(TemplateError::new(format!(
                    "the model's chat template needed more than {} MiB to render (or crashed its renderer); shorten the conversation or ask an operator to fix the template",
                    RENDER_MEMORY >> 20
                )));
            }
        };
        // Answered: the renderer is sound and goes back to the pool.
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE {
            idle.push(renderer);
        }
        result
    }
}
