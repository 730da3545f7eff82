//! OpenAI-compatible inference endpoints: `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions`, whole or streamed as server-sent events.
//!
//! Each request is checked against the caller's tenant (allowed models, concurrent requests)
//! before it is tokenized and handed to the model's runner; the response is built from the
//! runner's events. Per-tenant, per-model token counts and latencies go to the metrics.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use tokio::sync::mpsc;

use super::error::{required_json, ApiError};
use super::openai_types::*;
use super::tools::{self, PastCall, Tools};
use super::Authenticated;
use crate::chat::{ChatInput, Message};
use crate::engine::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use crate::guide::{Grammar, Guide, GuideError};
use crate::policy::Role;
use crate::runner::{Event, Failure, FinishReason, GenerateRequest, ModelHandle, SubmitError};
use crate::sched::TenantParams;
use crate::state::{DaemonState, TenantSlot};

type Shared = State<Arc<DaemonState>>;

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;
/// Cap on the default `max_tokens` of chat completions (otherwise: the rest of the context).
const CHAT_DEFAULT_MAX_TOKENS: usize = 2048;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The tenant a request is accounted to: its tenant, or `operator` for an operator acting for none.
fn tenant_label(auth: &Authenticated) -> String {
    auth.identity
        .tenant
        .clone()
        .unwrap_or_else(|| crate::policy::RESERVED_TENANT_NAME.to_owned())
}

/// What the scheduler enforces for the caller: its tenant's weight, class and quotas (an
/// operator acting for no tenant is scheduled with the defaults).
fn scheduling_limits(auth: &Authenticated) -> TenantParams {
    match auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t))
    {
        Some(t) => TenantParams {
            weight: t.weight.max(1),
            class: if auth.batch {
                crate::policy::PriorityClass::Batch
            } else {
                t.class
            },
            tokens_per_minute: t.limits.tokens_per_minute,
            kv_blocks: t.limits.kv_blocks,
            host_kv_blocks: t.limits.host_kv_blocks,
            disk_kv_blocks: t.limits.disk_kv_blocks,
            encrypt_disk_kv: t.encrypt_kv_at_rest,
        },
        None => TenantParams::default(),
    }
}

pub(super) async fn list_models(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Json<ModelList> {
    let tenant = auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t));
    let data = state
        .models()
        .iter()
        .filter(|m| tenant.is_none_or(|t| t.allows_model(&m.info.name)))
        .map(model_entry)
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

fn model_entry(m: &ModelHandle) -> ModelEntry {
    ModelEntry {
        id: m.info.name.clone(),
        object: "model".into(),
        created: m.info.created,
        owned_by: "accel".into(),
        format: m.info.format.clone(),
        backend: m.info.backend.clone(),
        context_length: m.info.context_length,
        sampling_defaults: m.info.sampling_defaults,
    }
}

/// `GET /v1/models/{name}`: one model, if the caller may use it (else the same 404 as a model
/// that does not exist).
pub(super) async fn retrieve_model(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<ModelEntry>, ApiError> {
    let tenant = auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t));
    state
        .model(&name)
        .filter(|m| tenant.is_none_or(|t| t.allows_model(&m.info.name)))
        .map(|m| Json(model_entry(&m)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model {:?} is not served to you; see GET /v1/models",
                    name.chars().take(64).collect::<String>()
                ),
            )
        })
}

/// One of the caller's tenant's request slots (`limits.max_concurrent_requests`), taken when
/// the request's headers are read, before its body, and held until its answer is done.
#[derive(Debug, Clone)]
pub(crate) struct RequestSlot(pub Arc<TenantSlot>);

/// Takes a request slot for the caller's tenant, or answers 429.
pub(super) fn take_slot(
    state: &Arc<DaemonState>,
    auth: &Authenticated,
) -> Result<RequestSlot, ApiError> {
    let tenant = auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t));
    let limit = match (auth.identity.role, tenant) {
        (Role::Operator, None) => None,
        (_, t) => t.and_then(|t| t.limits.max_concurrent_requests),
    };
    let slot = state.enter_tenant(&tenant_label(auth), limit).map_err(|in_flight| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "concurrency_limit",
            format!(
                "tenant {:?} already has {in_flight} requests in flight, its limit (limits.max_concurrent_requests); wait for one to finish or ask an operator to raise it",
                tenant_label(auth)
            ),
        )
    })?;
    Ok(RequestSlot(Arc::new(slot)))
}

/// Finds the model and checks the tenant may use it; takes a request slot unless the request
/// already holds one.
fn admit(
    state: &Arc<DaemonState>,
    auth: &Authenticated,
    model: &str,
    slot: Option<RequestSlot>,
) -> Result<(ModelHandle, Arc<TenantSlot>), ApiError> {
    let tenant = auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t));
    let usable = |name: &str| tenant.is_none_or(|t| t.allows_model(name));
    // A model the caller may not use is answered exactly like one that does not exist, and
    // only the caller's own models are listed, so a tenant learns nothing of the others'.
    let handle = state
        .model(model)
        .filter(|m| usable(&m.info.name))
        .ok_or_else(|| {
            let models = state.models();
            let names: Vec<&str> = models
                .iter()
                .map(|m| m.info.name.as_str())
                .filter(|n| usable(n))
                .collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model {model:?} is not served to you; yours: {}",
                    if names.is_empty() {
                        "none (ask an operator)".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        })?;
    let slot = match slot {
        Some(slot) => slot,
        None => take_slot(state, auth)?,
    };
    Ok((handle.clone(), slot.0))
}

/// How long a chat template may take to render.
const TEMPLATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Most stop strings per request, and their longest length in bytes.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// Fields a client may send that accel cannot honour: named in a 400, never ignored.
fn refuse_unsupported(common: &CommonFields, chat: bool) -> Result<(), ApiError> {
    let set = |v: &Option<serde_json::Value>| {
        v.as_ref().is_some_and(|v| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Object(o) => !o.is_empty(),
            serde_json::Value::Array(a) => !a.is_empty(),
            _ => true,
        })
    };
    let mut refused = Vec::new();
    if set(&common.logit_bias) {
        refused.push("logit_bias");
    }
    // Tools are served on chat; the deprecated `functions` form on neither.
    if !chat && set(&common.tools) {
        refused.push("tools");
    }
    for (name, value) in [
        ("functions", &common.functions),
        ("function_call", &common.function_call),
    ] {
        if set(value) {
            refused.push(name);
        }
    }
    // `tool_choice: "none"` asks for what a completion does anyway.
    if !chat && set(&common.tool_choice) && common.tool_choice != Some(serde_json::json!("none")) {
        refused.push("tool_choice");
    }
    if set(&common.audio) {
        refused.push("audio");
    }
    if common
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        refused.push("modalities other than text");
    }
    if set(&common.prediction) {
        refused.push("prediction");
    }
    if common.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        refused.push("suffix");
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_field",
            format!(
                "{} {} not supported by accel yet; remove {} and send the request again",
                refused.join(", "),
                if refused.len() == 1 { "is" } else { "are" },
                if refused.len() == 1 { "it" } else { "them" },
            ),
        ))
    }
}

/// Roles a chat message may have.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The request's sampling; what it leaves out comes from the model's defaults, then OpenAI's.
fn sampling(
    common: &CommonFields,
    model: &ModelHandle,
    top_logprobs: usize,
) -> Result<SamplingParams, ApiError> {
    let stops = common.stop.clone().into_vec();
    if stops.len() > MAX_STOP_STRINGS || stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_request(format!(
            "stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    if common.n.unwrap_or(1) != 1 || common.best_of.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request(
            "n and best_of other than 1 are not supported; send separate requests",
        ));
    }
    let defaults = SamplingParams::default();
    let model = &model.info.sampling_defaults;
    let params = SamplingParams {
        temperature: common
            .temperature
            .or(model.temperature)
            .unwrap_or(defaults.temperature),
        top_k: common.top_k.or(model.top_k).unwrap_or(defaults.top_k),
        top_p: common.top_p.or(model.top_p).unwrap_or(defaults.top_p),
        min_p: common.min_p.unwrap_or(0.0),
        repetition_penalty: common
            .repetition_penalty
            .or(model.repetition_penalty)
            .unwrap_or(defaults.repetition_penalty),
        presence_penalty: common.presence_penalty.unwrap_or(0.0),
        frequency_penalty: common.frequency_penalty.unwrap_or(0.0),
        seed: common.seed,
        top_logprobs,
    };
    let problems = params.validate();
    if problems.is_empty() {
        Ok(params)
    } else {
        Err(ApiError::bad_request(problems.join("; ")))
    }
}

/// Longest a request's grammar may take to compile (the first one for a model also indexes
/// its vocabulary); llguidance's fuel limits bound it well below this.
const GRAMMAR_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The constraint a request asks for, from OpenAI's `response_format` or vLLM's `guided_*`
/// fields; at most one may be given.
fn grammar(common: &CommonFields) -> Result<Option<Grammar>, ApiError> {
    let mut asked: Vec<(&str, Grammar)> = Vec::new();
    if let Some(format) = &common.response_format {
        match format.kind.as_str() {
            "text" => {}
            "json_object" => asked.push(("response_format", Grammar::JsonObject)),
            "json_schema" => {
                let schema = format
                    .json_schema
                    .as_ref()
                    .and_then(|s| s.schema.clone())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "response_format.json_schema.schema is required with type json_schema",
                        )
                    })?;
                asked.push(("response_format", Grammar::JsonSchema(schema)));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "response_format.type {other:?} is not one of text, json_object, json_schema"
                )))
            }
        }
    }
    if let Some(schema) = &common.guided_json {
        asked.push(("guided_json", Grammar::JsonSchema(schema.clone())));
    }
    if let Some(options) = &common.guided_choice {
        asked.push(("guided_choice", Grammar::Choice(options.clone())));
    }
    if let Some(rx) = &common.guided_regex {
        asked.push(("guided_regex", Grammar::Regex(rx.clone())));
    }
    if let Some(lark) = &common.guided_grammar {
        asked.push(("guided_grammar", Grammar::Lark(lark.clone())));
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|(name, _)| *name).collect();
        return Err(ApiError::bad_request(format!(
            "{} each constrain the output; send one",
            names.join(", ")
        )));
    }
    Ok(asked.pop().map(|(_, grammar)| grammar))
}

/// Compiles a request's grammar off the async threads, under [`GRAMMAR_DEADLINE`]; the
/// tenant's request slot stays taken until the compilation really ends.
async fn compile(
    model: &ModelHandle,
    slot: &Arc<TenantSlot>,
    grammar: Grammar,
) -> Result<Guide, ApiError> {
    let guides = Arc::clone(model.guides());
    let held = Arc::clone(slot);
    let compiling = tokio::task::spawn_blocking(move || {
        let _held = held;
        guides.compile(&grammar)
    });
    match tokio::time::timeout(GRAMMAR_DEADLINE, compiling).await {
        Ok(Ok(Ok(guide))) => Ok(guide),
        Ok(Ok(Err(GuideError::Invalid(message)))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grammar",
            message,
        )),
        Ok(Ok(Err(GuideError::Unavailable(message)))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "grammar_unsupported",
            message,
        )),
        Ok(Ok(Err(GuideError::Failed(message)))) => {
            tracing::error!(model = %model.info.name, error = %message, "compiling a request's grammar failed");
            Err(ApiError::internal(
                "compiling the output's grammar failed; see the daemon log",
            ))
        }
        Ok(Err(_)) => Err(ApiError::internal(
            "compiling the output's grammar failed; see the daemon log",
        )),
        Err(_) => Err(ApiError::bad_request(format!(
            "the output's grammar took longer than {}s to compile; simplify it",
            GRAMMAR_DEADLINE.as_secs()
        ))),
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Stopped | SubmitError::Dedicated(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            e.to_string(),
        ),
        SubmitError::QueueFull {
            retry_after_secs, ..
        } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
            .with_retry_after(retry_after_secs),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    }
}

/// Everything a generation needs after validation.
struct Job {
    id: String,
    model: ModelHandle,
    slot: Arc<TenantSlot>,
    events: mpsc::UnboundedReceiver<Event>,
    stream: bool,
    include_usage: bool,
    top_logprobs: Option<usize>,
    chat: bool,
    started: Instant,
    prompt_tokens: usize,
    /// Tools on offer: the output is read for calls.
    tools: Option<Tools>,
}

impl Job {
    /// The calls in `output` as the answer carries them (`index` in streamed deltas).
    fn calls(&self, output: &str, streamed: bool) -> Option<Vec<ToolCall>> {
        let calls = self.tools.as_ref()?.read_calls(output)?;
        let stem = self.id.rsplit('-').next().unwrap_or_default();
        Some(
            calls
                .into_iter()
                .enumerate()
                .map(|(i, call)| ToolCall {
                    index: streamed.then_some(i),
                    id: format!("call_{stem}_{i}"),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: call.name,
                        arguments: call.arguments,
                    },
                })
                .collect(),
        )
    }
}

pub(super) async fn completions(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    slot: Option<Extension<RequestSlot>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = required_json(body)?;
    if request.echo {
        return Err(ApiError::bad_request("echo is not supported"));
    }
    let top = request.logprobs;
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad_request(format!(
            "logprobs is {}; at most {MAX_TOP_LOGPROBS}",
            top.unwrap_or(0)
        )));
    }
    refuse_unsupported(&request.common, false)?;
    let (model, slot) = admit(&state, &auth, &request.common.model, slot.map(|s| s.0))?;
    let params = sampling(&request.common, &model, top.unwrap_or(0))?;
    let prompt = match request.prompt {
        PromptInput::Text(text) => model
            .tokenizer()
            .encode(&text)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        PromptInput::Texts(texts) if texts.len() == 1 => model
            .tokenizer()
            .encode(&texts[0])
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        PromptInput::Texts(texts) => {
            return Err(ApiError::bad_request(format!(
                "prompt holds {} strings; send one per request",
                texts.len()
            )))
        }
        PromptInput::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= model.info.vocab_size) {
                return Err(ApiError::bad_request(format!(
                    "prompt token {bad} is outside the model's vocabulary of {}",
                    model.info.vocab_size
                )));
            }
            ids
        }
    };
    let max_tokens = request
        .common
        .max_tokens
        .unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS);
    start(
        state,
        auth,
        model,
        slot,
        prompt,
        params,
        max_tokens,
        request.common,
        top,
        false,
        None,
    )
    .await
}

pub(super) async fn chat_completions(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    slot: Option<Extension<RequestSlot>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = required_json(body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages is empty; send at least one message",
        ));
    }
    let top = match (request.logprobs, request.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::bad_request("top_logprobs needs logprobs: true")),
        (false, None) => None,
        (true, n) => Some(n.unwrap_or(0)),
    };
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad_request(format!(
            "top_logprobs is at most {MAX_TOP_LOGPROBS}"
        )));
    }
    refuse_unsupported(&request.common, true)?;
    let tools = Tools::from_request(
        request.common.tools.as_ref(),
        request.common.tool_choice.as_ref(),
    )
    .map_err(ApiError::bad_request)?;
    let (model, slot) = admit(&state, &auth, &request.common.model, slot.map(|s| s.0))?;
    let params = sampling(&request.common, &model, top.unwrap_or(0))?;
    let mut conversation = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.into_iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role {:?} is not one of {}",
                m.role.chars().take(40).collect::<String>(),
                ROLES.join(", ")
            )));
        }
        // Chat templates know `system`; OpenAI's newer name for it is `developer`.
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        let calls: Vec<PastCall> = m
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(j, call)| PastCall {
                id: if call.id.is_empty() {
                    format!("call_{i}_{j}")
                } else {
                    call.id
                },
                name: call.function.name,
                arguments: call.function.arguments,
            })
            .collect();
        let content = match m.content {
            None if role == "assistant" && !calls.is_empty() => String::new(),
            None => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content is missing; only an assistant's message with tool_calls may leave it out"
                )))
            }
            Some(ContentInput::Text(text)) => text,
            Some(ContentInput::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => return Err(ApiError::bad_request(format!("messages[{i}].content: parts of type {kind:?} are not supported; send text"))),
                    }
                }
                text
            }
        };
        conversation.push((
            Message {
                role,
                content,
                tool_call_id: m.tool_call_id,
                name: m.name,
                ..Message::default()
            },
            calls,
        ));
    }
    let template = model.chat_template().ok_or_else(|| {
        ApiError::bad_request(format!(
            "model {:?} has no chat template; use /v1/completions",
            model.info.name
        ))
    })?;
    // Calls and results go to a template that knows them as they are; to one that does not,
    // as text it can render.
    let (messages, tool_definitions) = if template.takes_tools() {
        let messages = conversation
            .into_iter()
            .map(|(mut message, calls)| {
                if !calls.is_empty() {
                    message.tool_calls = Some(calls.iter().map(PastCall::for_template).collect());
                }
                message
            })
            .collect();
        (
            messages,
            tools.as_ref().map(Tools::definitions).unwrap_or_default(),
        )
    } else {
        (tools::inline(conversation, tools.as_ref()), Vec::new())
    };
    let tokenizer = model.tokenizer();
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let eos = token_text(tokenizer.eos_ids().first().copied());
    // Off the async threads, under a deadline: the template came with the model file.
    let input = ChatInput {
        messages,
        tools: tool_definitions,
        add_generation_prompt: true,
        bos_token: token_text(tokenizer.bos_id()),
        eos_token: eos,
    };
    let rendering = {
        let model = model.clone();
        // The tenant's request slot stays taken until the rendering really ends, even past the
        // deadline, so a tenant cannot keep more renders running than its in-flight limit.
        let held = Arc::clone(&slot);
        tokio::task::spawn_blocking(move || {
            let _held = held;
            model.chat_template().map(|t| t.render(&input))
        })
    };
    let text = match tokio::time::timeout(TEMPLATE_DEADLINE, rendering).await {
        Ok(Ok(Some(rendered))) => rendered.map_err(|e| ApiError::bad_request(e.to_string()))?,
        Ok(Ok(None)) | Ok(Err(_)) => {
            return Err(ApiError::internal("rendering the chat template failed; see the daemon log"))
        }
        Err(_) => {
            return Err(ApiError::bad_request(format!(
                "the model's chat template took longer than {}s to render; shorten the conversation or ask an operator to fix the template",
                TEMPLATE_DEADLINE.as_secs()
            )))
        }
    };
    let prompt = tokenizer
        .encode(&text)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let remaining = model
        .info
        .context_length
        .saturating_sub(prompt.len())
        .max(1);
    let max_tokens = request
        .max_completion_tokens
        .or(request.common.max_tokens)
        .unwrap_or(remaining.min(CHAT_DEFAULT_MAX_TOKENS));
    start(
        state,
        auth,
        model,
        slot,
        prompt,
        params,
        max_tokens,
        request.common,
        top,
        true,
        tools,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn start(
    state: Arc<DaemonState>,
    auth: Authenticated,
    model: ModelHandle,
    slot: Arc<TenantSlot>,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    common: CommonFields,
    top_logprobs: Option<usize>,
    chat: bool,
    tools: Option<Tools>,
) -> Result<Response, ApiError> {
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens is 0; ask for at least one token",
        ));
    }
    let asked = grammar(&common)?;
    let called = tools.as_ref().and_then(Tools::grammar);
    let guide = match (asked, called) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "tool_choice \"required\" or a named function constrains the output to a call; drop response_format and guided_* fields",
            ))
        }
        (Some(grammar), None) | (None, Some(grammar)) => {
            Some(compile(&model, &slot, grammar).await?)
        }
        (None, None) => None,
    };
    let prompt_tokens = prompt.len();
    let events = model
        .submit(GenerateRequest {
            tenant: tenant_label(&auth),
            prompt,
            params,
            max_tokens,
            stop: common.stop.into_vec(),
            stop_token_ids: common.stop_token_ids,
            ignore_eos: common.ignore_eos,
            limits: scheduling_limits(&auth),
            guide,
        })
        .map_err(submit_error)?;
    tracing::debug!(tenant = %tenant_label(&auth), model = %model.info.name, prompt_tokens, max_tokens, "generation queued");
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    let events = state.requests.track(
        crate::requests::RequestInfo {
            id: id.clone(),
            tenant: tenant_label(&auth),
            model: model.info.name.clone(),
            stream: common.stream,
            batch: auth.batch,
            prompt_tokens,
        },
        events,
    );
    let job = Job {
        id,
        model,
        slot,
        events,
        stream: common.stream,
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
        top_logprobs,
        chat,
        started: Instant::now(),
        prompt_tokens,
        tools,
    };
    if job.stream {
        Ok(stream(state, job).into_response())
    } else {
        whole(state, job).await
    }
}

/// A failed generation's status and code: the server's failure may pass on a retry (503,
/// which clients retry); the request's own cannot (400).
fn failure_status(cause: Failure) -> (StatusCode, &'static str) {
    match cause {
        Failure::Server => (StatusCode::SERVICE_UNAVAILABLE, "generation_failed"),
        Failure::Request => (StatusCode::BAD_REQUEST, "request_cannot_be_served"),
        // Not 409 or 5xx, which SDKs retry: the operator meant it to stop.
        Failure::Cancelled => (StatusCode::GONE, "cancelled"),
    }
}

/// Per-request bookkeeping for metrics.
struct Timing {
    last_token: Option<Instant>,
}

impl Timing {
    /// Counts each token as it arrives, so a request its client abandons is still accounted
    /// for what was processed and generated.
    fn token(&mut self, state: &DaemonState, job: &Job) {
        let now = Instant::now();
        let labels = [job.slot.tenant(), job.model.info.name.as_str()];
        state
            .metrics
            .generation_tokens
            .with_label_values(&labels)
            .inc();
        match self.last_token {
            None => {
                state
                    .metrics
                    .prompt_tokens
                    .with_label_values(&labels)
                    .inc_by(job.prompt_tokens as u64);
                state
                    .metrics
                    .time_to_first_token
                    .with_label_values(&labels)
                    .observe(now.duration_since(job.started).as_secs_f64())
            }
            Some(last) => state
                .metrics
                .inter_token_latency
                .with_label_values(&labels)
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    fn done(&self, state: &DaemonState, job: &Job, reason: &str) {
        let labels = [job.slot.tenant(), job.model.info.name.as_str()];
        let m = &state.metrics;
        m.request_duration
            .with_label_values(&labels)
            .observe(job.started.elapsed().as_secs_f64());
        m.inference_requests
            .with_label_values(&[job.slot.tenant(), job.model.info.name.as_str(), reason])
            .inc();
    }
}

fn reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A token's text for log-probabilities; a token that is only part of a character shows as
/// its vocabulary entry rather than as a replacement character.
fn token_string(model: &ModelHandle, id: u32) -> String {
    let tokenizer = model.tokenizer();
    match tokenizer.decode(&[id], false) {
        Ok(text) if !text.contains('\u{FFFD}') => text,
        _ => tokenizer.id_to_token(id).unwrap_or_default(),
    }
}

fn chat_logprob(model: &ModelHandle, token: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
    let text = token_string(model, token);
    TokenLogprob {
        bytes: text.as_bytes().to_vec(),
        token: text,
        logprob,
        top_logprobs: top
            .iter()
            .map(|&(id, lp)| {
                let t = token_string(model, id);
                TopLogprob {
                    bytes: t.as_bytes().to_vec(),
                    token: t,
                    logprob: lp,
                }
            })
            .collect(),
    }
}

/// Waits for the whole generation and answers once.
async fn whole(state: Arc<DaemonState>, mut job: Job) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut timing = Timing { last_token: None };
    let mut legacy = CompletionLogprobs::default();
    let mut chat_lp = ChatLogprobs::default();
    loop {
        match job.events.recv().await {
            Some(Event::Token {
                text: delta,
                token,
                logprob,
                top,
            }) => {
                timing.token(&state, &job);
                if job.top_logprobs.is_some() {
                    if job.chat {
                        chat_lp
                            .content
                            .push(chat_logprob(&job.model, token, logprob, &top));
                    } else {
                        legacy.text_offset.push(text.len());
                        legacy.tokens.push(token_string(&job.model, token));
                        legacy.token_logprobs.push(logprob);
                        legacy.top_logprobs.push(
                            top.iter()
                                .map(|&(id, lp)| (token_string(&job.model, id), lp))
                                .collect::<BTreeMap<_, _>>(),
                        );
                    }
                }
                text.push_str(&delta);
            }
            Some(Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                let calls = job.calls(&text, false);
                let reason = if calls.is_some() {
                    "tool_calls"
                } else {
                    reason_str(reason)
                };
                timing.done(&state, &job, reason);
                let usage = Some(Usage::new(prompt_tokens, completion_tokens, cached_tokens));
                let created = unix_now();
                let body = if job.chat {
                    serde_json::to_value(ChatResponse {
                        id: job.id,
                        object: "chat.completion".into(),
                        created,
                        model: job.model.info.name.clone(),
                        choices: vec![ChatChoice {
                            index: 0,
                            message: Some(ChatMessageOut {
                                role: Some("assistant".into()),
                                content: calls.is_none().then_some(text),
                                tool_calls: calls,
                            }),
                            delta: None,
                            logprobs: job.top_logprobs.map(|_| chat_lp),
                            finish_reason: Some(reason.into()),
                        }],
                        usage,
                    })
                } else {
                    serde_json::to_value(CompletionResponse {
                        id: job.id,
                        object: "text_completion".into(),
                        created,
                        model: job.model.info.name.clone(),
                        choices: vec![CompletionChoice {
                            index: 0,
                            text,
                            logprobs: job.top_logprobs.map(|_| legacy),
                            finish_reason: Some(reason.into()),
                        }],
                        usage,
                    })
                };
                return body
                    .map(|v| Json(v).into_response())
                    .map_err(|e| ApiError::internal(format!("cannot encode the response: {e}")));
            }
            Some(Event::Error { message, cause }) => {
                let (status, code) = failure_status(cause);
                return Err(ApiError::new(
                    status,
                    code,
                    format!("generation failed: {message}"),
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "model_unavailable",
                    "the model's runner stopped mid-request; see the daemon log",
                ))
            }
        }
    }
}

/// One streamed token's log-probability: token, logprob, top alternatives.
type ChunkLogprob = (u32, f32, Vec<(u32, f32)>);

/// Streams the generation as server-sent events, OpenAI style, ending with `[DONE]`.
fn stream(
    state: Arc<DaemonState>,
    job: Job,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct Streaming {
        state: Arc<DaemonState>,
        job: Job,
        timing: Timing,
        sent_role: bool,
        finished: bool,
        done_sent: bool,
        /// With tools on offer: output held back while it may be a call, and its tokens'
        /// log-probabilities (sent with it).
        held: String,
        held_logprobs: Vec<ChunkLogprob>,
        /// The output is text, not a call: it streams as it comes.
        passing: bool,
        /// Chunks to send before the next event.
        queued: std::collections::VecDeque<String>,
    }
    let init = Streaming {
        state,
        job,
        timing: Timing { last_token: None },
        sent_role: false,
        finished: false,
        done_sent: false,
        held: String::new(),
        held_logprobs: Vec::new(),
        passing: false,
        queued: std::collections::VecDeque::new(),
    };
    let events = futures_util::stream::unfold(init, |mut s| async move {
        if let Some(data) = s.queued.pop_front() {
            return Some((Ok(SseEvent::default().data(data)), s));
        }
        if s.done_sent {
            return None;
        }
        if s.finished {
            s.done_sent = true;
            return Some((Ok(SseEvent::default().data("[DONE]")), s));
        }
        let chunk = |s: &Streaming,
                     text: Option<String>,
                     logprobs: Vec<ChunkLogprob>,
                     reason: Option<&str>,
                     usage: Option<Usage>,
                     tool_calls: Option<Vec<ToolCall>>| {
            let job = &s.job;
            let created = unix_now();
            if job.chat {
                let delta = ChatMessageOut {
                    role: (!s.sent_role).then(|| "assistant".to_owned()),
                    content: text,
                    tool_calls,
                };
                serde_json::to_string(&ChatResponse {
                    id: job.id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: job.model.info.name.clone(),
                    choices: vec![ChatChoice {
                        index: 0,
                        message: None,
                        delta: Some(delta),
                        logprobs: (!logprobs.is_empty()).then(|| ChatLogprobs {
                            content: logprobs
                                .iter()
                                .map(|(t, lp, top)| chat_logprob(&job.model, *t, *lp, top))
                                .collect(),
                        }),
                        finish_reason: reason.map(str::to_owned),
                    }],
                    usage,
                })
            } else {
                serde_json::to_string(&CompletionResponse {
                    id: job.id.clone(),
                    object: "text_completion".into(),
                    created,
                    model: job.model.info.name.clone(),
                    choices: vec![CompletionChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        logprobs: (!logprobs.is_empty()).then(|| CompletionLogprobs {
                            tokens: logprobs.iter().map(|(t, _, _)| token_string(&job.model, *t)).collect(),
                            token_logprobs: logprobs.iter().map(|(_, lp, _)| *lp).collect(),
                            top_logprobs: logprobs
                                .iter()
                                .map(|(_, _, top)| top.iter().map(|&(id, v)| (token_string(&job.model, id), v)).collect())
                                .collect(),
                            text_offset: Vec::new(),
                        }),
                        finish_reason: reason.map(str::to_owned),
                    }],
                    usage,
                })
            }
            .unwrap_or_else(|e| format!("{{\"error\":{{\"code\":\"internal\",\"message\":\"cannot encode chunk: {e}\"}}}}"))
        };
        let event = loop {
            break match s.job.events.recv().await {
                Some(Event::Token {
                    text,
                    token,
                    logprob,
                    top,
                }) => {
                    s.timing.token(&s.state, &s.job);
                    if s.job.top_logprobs.is_some() {
                        s.held_logprobs.push((token, logprob, top));
                    }
                    let text = match &s.job.tools {
                        Some(tools) if !s.passing => {
                            s.held.push_str(&text);
                            if tools.may_be_call(&s.held) {
                                continue; // it may be a call: sent whole at the end
                            }
                            s.passing = true;
                            std::mem::take(&mut s.held)
                        }
                        _ => text,
                    };
                    let logprobs = std::mem::take(&mut s.held_logprobs);
                    let data = chunk(&s, Some(text), logprobs, None, None, None);
                    s.sent_role = true;
                    data
                }
                Some(Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let held = std::mem::take(&mut s.held);
                    let calls = s.job.calls(&held, true);
                    let reason = if calls.is_some() {
                        "tool_calls"
                    } else {
                        reason_str(reason)
                    };
                    s.timing.done(&s.state, &s.job, reason);
                    s.finished = true;
                    let usage = s
                        .job
                        .include_usage
                        .then(|| Usage::new(prompt_tokens, completion_tokens, cached_tokens));
                    // What was held back goes out before the finish: the calls, or the text
                    // it turned out to be.
                    let logprobs = std::mem::take(&mut s.held_logprobs);
                    if calls.is_none() && held.is_empty() {
                        chunk(&s, None, Vec::new(), Some(reason), usage, None)
                    } else {
                        let data = match calls {
                            Some(calls) => chunk(&s, None, logprobs, None, None, Some(calls)),
                            None => chunk(&s, Some(held), logprobs, None, None, None),
                        };
                        s.sent_role = true;
                        s.queued
                            .push_back(chunk(&s, None, Vec::new(), Some(reason), usage, None));
                        data
                    }
                }
                Some(Event::Error { message, cause }) => {
                    s.finished = true;
                    let (_, code) = failure_status(cause);
                    serde_json::json!({"error": {"code": code, "message": format!("generation failed: {message}")}}).to_string()
                }
                None => {
                    s.finished = true;
                    serde_json::json!({"error": {"code": "model_unavailable", "message": "the model's runner stopped mid-request; see the daemon log"}}).to_string()
                }
            };
        };
        Some((Ok(SseEvent::default().data(event)), s))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
