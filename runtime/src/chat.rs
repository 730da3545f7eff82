//! Chat templates: renders a model's Hugging Face (Jinja) chat template with `minijinja`,
//! configured as transformers configures Jinja (`trim_blocks`, `lstrip_blocks`, the
//! `raise_exception` and `strftime_now` helpers), so prompts match the reference token for token.
//!
//! Templates come with third-party model files, so rendering is bounded: a fuel budget of VM
//! instructions ([`TEMPLATE_FUEL`]), a cap on the rendered size ([`MAX_RENDERED_BYTES`]), and a
//! panic inside the engine is an error for that request. Callers render off async threads
//! under a deadline; the daemon's templates render in memory-limited processes
//! (`crate::worker::render`), since memory is the one thing fuel does not bound.

use serde::{Deserialize, Serialize};

/// One chat message as templates see it (Hugging Face's shape): an assistant's message may
/// carry `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": {...}}}`),
/// a tool's result its `tool_call_id` and the function's `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
            ..Self::default()
        }
    }
}

/// What a template renders: the conversation, the tools on offer, and the special tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatInput {
    pub messages: Vec<Message>,
    /// Tool definitions in OpenAI's shape, for templates that take `tools`; empty: none (the
    /// template sees `none`, as transformers passes it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<serde_json::Value>,
    /// End with the assistant's turn opened.
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatInput {
    /// `messages` with the assistant's turn opened, no tools, no special tokens.
    pub fn prompt(messages: &[Message]) -> Self {
        Self {
            messages: messages.to_vec(),
            add_generation_prompt: true,
            ..Self::default()
        }
    }
}

/// A template that failed to parse or render; the message says where.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl TemplateError {
    pub fn new(message: String) -> Self {
        Self(message)
    }
}

/// VM instructions one rendering may execute; templates shipped with models use a few
/// thousand for a long conversation.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Largest rendered prompt, in bytes.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;

/// A `Write` that refuses to grow past a cap.
struct Capped {
    out: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.cap {
            return Err(std::io::Error::other("output cap"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Most items a sequence may have where a template prints or materializes it: a chat is a few
/// hundred messages, while `messages * 1000000000` is a lazy sequence that no fuel counts.
pub const MAX_SEQUENCE_ITEMS: usize = 100_000;

fn bounded(value: &minijinja::Value) -> Result<(), minijinja::Error> {
    if value.as_str().is_none() && value.len().is_some_and(|n| n > MAX_SEQUENCE_ITEMS) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("a sequence of more than {MAX_SEQUENCE_ITEMS} items"),
        ));
    }
    Ok(())
}

/// Prints values as the default formatter does, refusing oversized sequences.
fn bounded_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &minijinja::Value,
) -> Result<(), minijinja::Error> {
    bounded(value)?;
    minijinja::escape_formatter(out, state, value)
}

type State<'a, 'b> = minijinja::State<'a, 'b>;
type Value = minijinja::Value;
type Fallible = Result<Value, minijinja::Error>;

// The builtin filters that walk a whole sequence, with the same bound first.
fn join(state: &State, v: &Value, j: Option<minijinja::value::StringInput<'_>>) -> Fallible {
    bounded(v)?;
    minijinja::filters::join(state, v, j)
}
fn list(state: &State, v: Value) -> Fallible {
    bounded(&v)?;
    minijinja::filters::list(state, v)
}
fn string(state: &State, v: &Value) -> Fallible {
    bounded(v)?;
    minijinja::filters::string(state, v)
}
fn tojson(v: &Value, indent: Option<Value>, args: minijinja::value::Kwargs) -> Fallible {
    bounded(v)?;
    minijinja::filters::tojson(v, indent, args)
}
fn sort(state: &State, v: Value, args: minijinja::value::Kwargs) -> Fallible {
    bounded(&v)?;
    minijinja::filters::sort(state, v, args)
}
fn unique(state: &State, v: Value, args: minijinja::value::Kwargs) -> Fallible {
    bounded(&v)?;
    minijinja::filters::unique(state, v, args)
}
fn reverse(v: &Value) -> Fallible {
    bounded(v)?;
    minijinja::filters::reverse(v)
}
fn sum(state: &State, v: Value) -> Fallible {
    bounded(&v)?;
    minijinja::filters::sum(state, v)
}
fn min(state: &State, v: Value) -> Fallible {
    bounded(&v)?;
    minijinja::filters::min(state, v)
}
fn max(state: &State, v: Value) -> Fallible {
    bounded(&v)?;
    minijinja::filters::max(state, v)
}
fn last(v: Value) -> Fallible {
    bounded(&v)?;
    minijinja::filters::last(v)
}
fn items(v: &Value) -> Fallible {
    bounded(v)?;
    minijinja::filters::items(v)
}
fn dictsort(v: &Value, args: minijinja::value::Kwargs) -> Fallible {
    bounded(v)?;
    minijinja::filters::dictsort(v, args)
}
fn groupby(v: Value, attribute: Option<&str>, args: minijinja::value::Kwargs) -> Fallible {
    bounded(&v)?;
    minijinja::filters::groupby(v, attribute, args)
}
fn map(state: &State, v: Value, args: minijinja::value::Rest<Value>) -> Fallible {
    bounded(&v)?;
    minijinja::filters::map(state, v, args).map(Value::from)
}

/// A count or width a template passes to a filter, which sizes an allocation.
fn bounded_count(count: usize) -> Result<(), minijinja::Error> {
    if count > MAX_SEQUENCE_ITEMS {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("a count of more than {MAX_SEQUENCE_ITEMS} items"),
        ));
    }
    Ok(())
}
fn batch(state: &State, v: Value, count: usize, fill: Option<Value>) -> Fallible {
    bounded(&v)?;
    bounded_count(count)?;
    minijinja::filters::batch(state, v, count, fill)
}
fn slice(state: &State, v: Value, count: usize, fill: Option<Value>) -> Fallible {
    bounded(&v)?;
    bounded_count(count)?;
    minijinja::filters::slice(state, v, count, fill)
}
fn indent(
    v: minijinja::value::StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    args: minijinja::value::Kwargs,
) -> Fallible {
    bounded_count(width.unwrap_or(0))?;
    minijinja::filters::indent(v, width, first, blank, args)
}

/// A parsed chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    /// Where renderings happen when not in this process (the daemon's renderer processes).
    sandbox: Option<crate::worker::render::TemplateSandbox>,
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

fn strftime_now(format: String) -> String {
    // Only the date matters to templates that use it ("Today Date: 26 Jul 2024"); an
    // unsupported format degrades to ISO form rather than failing the request.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = now / 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[(m - 1) as usize];
    format
        .replace("%d", &format!("{d:02}"))
        .replace("%b", month)
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_formatter(bounded_formatter);
        env.add_filter("join", join);
        env.add_filter("list", list);
        env.add_filter("string", string);
        env.add_filter("tojson", tojson);
        env.add_filter("sort", sort);
        env.add_filter("unique", unique);
        env.add_filter("reverse", reverse);
        env.add_filter("sum", sum);
        env.add_filter("min", min);
        env.add_filter("max", max);
        env.add_filter("last", last);
        env.add_filter("items", items);
        env.add_filter("dictsort", dictsort);
        env.add_filter("groupby", groupby);
        env.add_filter("map", map);
        env.add_filter("batch", batch);
        env.add_filter("slice", slice);
        env.add_filter("indent", indent);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            sandbox: None,
        })
    }

    /// Renders in renderer processes run as `identity`, memory-limited, rather than here.
    pub fn in_sandbox(mut self, identity: crate::worker::WorkerIdentity) -> Self {
        self.sandbox = Some(crate::worker::render::TemplateSandbox::new(
            &self.source,
            identity,
        ));
        self
    }

    /// Whether the template does anything with `tools` (Llama 3's, Qwen2's and others do;
    /// a plain ChatML one does not).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The prompt for `input`; in a renderer process when this template has them.
    pub fn render(&self, input: &ChatInput) -> Result<String, TemplateError> {
        match &self.sandbox {
            Some(sandbox) => sandbox.render(input),
            None => self.render_here(input),
        }
    }

    /// Renders in this process (bounded by fuel and the output cap, not in memory).
    pub fn render_here(&self, input: &ChatInput) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        let context = minijinja::context! {
            messages => &input.messages,
            tools => (!input.tools.is_empty()).then_some(&input.tools),
            add_generation_prompt => input.add_generation_prompt,
            bos_token => &input.bos_token,
            eos_token => &input.eos_token,
        };
        let mut out = Capped {
            out: Vec::new(),
            cap: MAX_RENDERED_BYTES,
        };
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            template.render_captured_to(context, &mut out).map(drop)
        }));
        match rendered {
            Ok(Ok(_)) => String::from_utf8(out.out)
                .map_err(|_| TemplateError("the rendered prompt is not UTF-8".into())),
            Ok(Err(e)) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(TemplateError(format!(
                "the model's chat template ran more than {TEMPLATE_FUEL} instructions; shorten the conversation or fix the template"
            ))),
            Ok(Err(_)) if out.out.len() + 4096 > MAX_RENDERED_BYTES => Err(TemplateError(format!(
                "the model's chat template rendered more than {MAX_RENDERED_BYTES} bytes; shorten the conversation or fix the template"
            ))),
            Ok(Err(e)) => Err(TemplateError(e.to_string())),
            Err(_) => Err(TemplateError(
                "the model's chat template crashed the template engine; fix the template".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        )
        .unwrap();
        let messages = [Message::new("user", "hi")];
        assert_eq!(
            t.render(&ChatInput::prompt(&messages)).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&ChatInput {
                add_generation_prompt: false,
                ..ChatInput::prompt(&messages)
            })
            .unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = t.render(&ChatInput::default()).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn runaway_templates_are_stopped_by_fuel_and_the_output_cap() {
        let messages = [Message::new("user", "hi")];
        let started = std::time::Instant::now();
        let t = ChatTemplate::new("{{ messages * 1000000000 }}").unwrap();
        let err = t
            .render(&ChatInput::prompt(&messages))
            .unwrap_err()
            .to_string();
        assert!(err.contains("100000 items"), "{err}");
        let t = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}").unwrap();
        let err = t
            .render(&ChatInput::prompt(&messages))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instructions") || err.contains("bytes"),
            "{err}"
        );
        for filter in [
            "join",
            "list",
            "tojson",
            "sort",
            "unique",
            "reverse",
            "string",
            "min",
            "max",
            "last",
            "map('upper')",
            "groupby('role')",
            "batch(2)",
            "slice(2)",
        ] {
            let t = ChatTemplate::new(&format!("{{{{ (messages * 1000000000) | {filter} }}}}"))
                .unwrap();
            let err = t
                .render(&ChatInput::prompt(&messages))
                .unwrap_err()
                .to_string();
            assert!(err.contains("100000 items"), "{filter}: {err}");
        }
        let t = ChatTemplate::new("{{ 'x' * 100000000 }}").unwrap();
        assert!(t.render(&ChatInput::prompt(&messages)).is_err());
        // Counts and widths that size an allocation are bounded too.
        for call in [
            "[1] | batch(10000000000000)",
            "[1] | slice(10000000000000)",
            "'a' | indent(10000000000000)",
        ] {
            let t = ChatTemplate::new(&format!("{{{{ {call} }}}}")).unwrap();
            let err = t
                .render(&ChatInput::prompt(&messages))
                .unwrap_err()
                .to_string();
            assert!(err.contains("100000 items"), "{call}: {err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_665), (2026, 7, 31));
    }
}
