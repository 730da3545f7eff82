//! Tool calling in OpenAI's shape: a request's `tools` and `tool_choice` read and checked; the
//! conversation's calls and results handed to the chat template, or, for a template that does
//! nothing with `tools`, written into the conversation as Hermes-style `<tool_call>` text with
//! the tools described in the system message; and the model's output read back as calls.
//! With `tool_choice` `required` or a named function, the output is constrained to a call whose
//! arguments match the function's JSON schema.

use serde_json::{json, Value};

use crate::chat::Message;
use crate::guide::Grammar;

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// One function on offer.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// Its arguments' JSON schema.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model decides; its output is read for calls.
    Auto,
    /// It must call one of the tools.
    Required,
    /// It must call this one.
    Named(String),
}

/// The tools a request offers and how the model may use them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: Choice,
}

/// A call read from the model's output; `arguments` is a JSON object's text.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Tools {
    /// From the request's `tools` and `tool_choice`; `None` when no tool is offered or
    /// `tool_choice` is `none`. Errors name the field.
    pub fn from_request(
        tools: Option<&Value>,
        choice: Option<&Value>,
    ) -> Result<Option<Self>, String> {
        let listed = match tools {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(items)) => items.as_slice(),
            Some(_) => {
                return Err(
                    "tools must be a list of {\"type\": \"function\", \"function\": {...}}".into(),
                )
            }
        };
        if listed.len() > MAX_TOOLS {
            return Err(format!("tools lists {}; at most {MAX_TOOLS}", listed.len()));
        }
        let mut functions: Vec<Function> = Vec::with_capacity(listed.len());
        for (i, tool) in listed.iter().enumerate() {
            if tool["type"] != "function" {
                return Err(format!("tools[{i}].type must be \"function\""));
            }
            let f = &tool["function"];
            let name = f["name"].as_str().unwrap_or_default();
            if !valid_name(name) {
                return Err(format!(
                    "tools[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, '_' and '-'"
                ));
            }
            if functions.iter().any(|g| g.name == name) {
                return Err(format!("tools[{i}].function.name {name:?} is listed twice"));
            }
            let parameters = match &f["parameters"] {
                Value::Null => json!({"type": "object", "properties": {}}),
                p @ Value::Object(_) => p.clone(),
                _ => {
                    return Err(format!(
                        "tools[{i}].function.parameters must be a JSON schema object"
                    ))
                }
            };
            functions.push(Function {
                name: name.to_owned(),
                description: f["description"].as_str().map(str::to_owned),
                parameters,
            });
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) if s == "none" => return Ok(None),
            Some(Value::String(s)) if s == "auto" => Choice::Auto,
            Some(Value::String(s)) if s == "required" => Choice::Required,
            Some(named) if named["type"] == "function" => {
                let name = named["function"]["name"].as_str().unwrap_or_default();
                if !functions.iter().any(|f| f.name == name) {
                    return Err(format!(
                        "tool_choice names function {:?}, which tools does not list",
                        name.chars().take(64).collect::<String>()
                    ));
                }
                Choice::Named(name.to_owned())
            }
            Some(_) => {
                return Err("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}".into())
            }
        };
        if functions.is_empty() {
            return match choice {
                Choice::Auto => Ok(None),
                _ => Err("tool_choice asks for a call, but tools lists none".into()),
            };
        }
        Ok(Some(Self { functions, choice }))
    }

    /// The constraint `required` or a named function puts on the output: one call,
    /// `{"name": ..., "arguments": {...}}`, its arguments valid against the function's schema.
    /// Arguments whose schema says nothing of other properties get none: a caller's function
    /// takes the parameters it declares (OpenAI's strict mode asks the same of schemas).
    pub fn grammar(&self) -> Option<Grammar> {
        // The arguments' schemas move under the call's; their definitions (`$defs`, as
        // pydantic writes them) move to the root, renamed per function, so refs still resolve.
        let mut defs = serde_json::Map::new();
        let mut call = |f: &Function| {
            let mut arguments = f.parameters.clone();
            if let Some(object) = arguments.as_object_mut() {
                if object.contains_key("properties") {
                    object
                        .entry("additionalProperties")
                        .or_insert(Value::Bool(false));
                }
                for key in ["$defs", "definitions"] {
                    if let Some(Value::Object(found)) = object.remove(key) {
                        for (name, mut def) in found {
                            rename_refs(&f.name, &mut def);
                            defs.insert(format!("{}__{name}", f.name), def);
                        }
                    }
                }
            }
            rename_refs(&f.name, &mut arguments);
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        };
        let mut schema = match &self.choice {
            Choice::Auto => return None,
            Choice::Named(name) => call(self.functions.iter().find(|f| &f.name == name)?),
            Choice::Required => json!({
                "anyOf": self.functions.iter().map(&mut call).collect::<Vec<_>>()
            }),
        };
        if !defs.is_empty() {
            schema["$defs"] = Value::Object(defs);
        }
        Some(Grammar::JsonSchema(schema))
    }

    /// The tools in OpenAI's shape, as templates that take `tools` expect them.
    pub fn definitions(&self) -> Vec<Value> {
        self.functions
            .iter()
            .map(|f| {
                let mut function = json!({"name": f.name, "parameters": f.parameters});
                if let Some(d) = &f.description {
                    function["description"] = json!(d);
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// What a model whose template takes no tools is told about them.
    fn instructions(&self) -> String {
        let listed: Vec<String> = self
            .definitions()
            .iter()
            .map(|d| d["function"].to_string())
            .collect();
        format!(
            "You can call functions. These are available, one JSON object each:\n<tools>\n{}\n</tools>\nTo call one, answer with nothing but {CALL_OPEN}{{\"name\": \"<function name>\", \"arguments\": {{<arguments as JSON>}}}}{CALL_CLOSE}. Otherwise answer normally.",
            listed.join("\n")
        )
    }

    /// Whether the output so far may still be a call, so a stream holds it back: all of it
    /// under `required` or a named function; under `auto`, while it is empty, a start of
    /// `<tool_call>`, or begins with one or with JSON.
    pub fn may_be_call(&self, output: &str) -> bool {
        if self.choice != Choice::Auto {
            return true;
        }
        let t = output.trim_start();
        t.is_empty()
            || CALL_OPEN.starts_with(t)
            || t.starts_with(CALL_OPEN)
            || t.starts_with('{')
            || t.starts_with('[')
    }

    /// The calls in the model's output: `<tool_call>` blocks (Hermes, Qwen2, SmolLM2), or an
    /// output that is one JSON call or a list of them (Llama 3 writes `parameters` for
    /// `arguments`). Only calls of listed functions with object arguments count; `None` if
    /// there are none. An output that begins as text is text, calls or not: that is what a
    /// stream has already sent by the time a call could appear.
    pub fn read_calls(&self, output: &str) -> Option<Vec<Call>> {
        let t = output.trim();
        if !self.may_be_call(t) {
            return None;
        }
        let bodies: Vec<&str> = if t.starts_with(CALL_OPEN) {
            t.split(CALL_OPEN)
                .skip(1)
                .map(|part| part.split(CALL_CLOSE).next().unwrap_or_default().trim())
                .collect()
        } else if t.starts_with('{') || t.starts_with('[') {
            vec![t]
        } else {
            return None;
        };
        let mut calls = Vec::new();
        for body in bodies {
            let Ok(value) = serde_json::from_str::<Value>(body) else {
                continue;
            };
            let items = match value {
                Value::Array(items) => items,
                one => vec![one],
            };
            for item in items {
                let Some(name) = item["name"].as_str() else {
                    continue;
                };
                if !self.functions.iter().any(|f| f.name == name) {
                    continue;
                }
                let arguments = match item.get("arguments").or_else(|| item.get("parameters")) {
                    None | Some(Value::Null) => json!({}),
                    Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => continue,
                    },
                    Some(v @ Value::Object(_)) => v.clone(),
                    Some(_) => continue,
                };
                calls.push(Call {
                    name: name.to_owned(),
                    arguments: arguments.to_string(),
                });
            }
        }
        (!calls.is_empty()).then_some(calls)
    }
}

/// Points a function's local refs (`#/$defs/X`, `#/definitions/X`) at its definitions' new
/// names at the root. Recursion is bounded by the request's JSON, whose parser caps nesting.
fn rename_refs(function: &str, schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get_mut("$ref") {
                for prefix in ["#/$defs/", "#/definitions/"] {
                    if let Some(name) = target.strip_prefix(prefix) {
                        *target = format!("#/$defs/{function}__{name}");
                        break;
                    }
                }
            }
            for value in object.values_mut() {
                rename_refs(function, value);
            }
        }
        Value::Array(items) => {
            for item in items {
                rename_refs(function, item);
            }
        }
        _ => {}
    }
}

/// An assistant's call from the conversation, as templates (and this module) see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PastCall {
    pub id: String,
    pub name: String,
    /// As the client sent it: a JSON object's text, or anything else it wrote.
    pub arguments: String,
}

impl PastCall {
    /// Hugging Face's shape: arguments as an object where they parse as one, as transformers'
    /// templates expect.
    pub fn for_template(&self) -> Value {
        let arguments = serde_json::from_str::<Value>(&self.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!(self.arguments));
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}})
    }

    fn as_text(&self) -> String {
        let arguments = serde_json::from_str::<Value>(&self.arguments)
            .unwrap_or_else(|_| json!(self.arguments));
        // Name first, as the model is told to write it.
        format!(
            "{CALL_OPEN}{{\"name\": {}, \"arguments\": {arguments}}}{CALL_CLOSE}",
            json!(self.name)
        )
    }
}

/// A conversation with tool calls and results for a template that does nothing with
/// `tools`: the tools are described in the system message, an assistant's calls become
/// `<tool_call>` text (the form it is told to answer in), and a tool's result becomes a user
/// turn in `<tool_response>`.
pub fn inline(messages: Vec<(Message, Vec<PastCall>)>, tools: Option<&Tools>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    for (mut message, calls) in messages {
        if message.role == "tool" {
            message = Message::new(
                "user",
                &format!("<tool_response>\n{}\n</tool_response>", message.content),
            );
        } else if !calls.is_empty() {
            let text: Vec<String> = calls.iter().map(PastCall::as_text).collect();
            let content = if message.content.is_empty() {
                text.join("\n")
            } else {
                format!("{}\n{}", message.content, text.join("\n"))
            };
            message = Message::new(&message.role, &content);
        }
        out.push(message);
    }
    if let Some(tools) = tools {
        let instructions = tools.instructions();
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{instructions}", first.content);
            }
            _ => out.insert(0, Message::new("system", &instructions)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        Tools::from_request(
            Some(&json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])),
            None,
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn tools_and_tool_choice_are_read_and_checked_by_name() {
        let tools = weather();
        assert_eq!(tools.choice, Choice::Auto);
        assert_eq!(tools.functions[0].name, "get_weather");
        let list = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(
            Tools::from_request(Some(&list), Some(&json!("none"))).unwrap(),
            None
        );
        let named = Tools::from_request(
            Some(&list),
            Some(&json!({"type": "function", "function": {"name": "f"}})),
        );
        assert_eq!(named.unwrap().unwrap().choice, Choice::Named("f".into()));
        for (tools, choice, needle) in [
            (
                json!([{"type": "function", "function": {"name": "bad name"}}]),
                Value::Null,
                "tools[0].function.name",
            ),
            (json!([{"type": "retrieval"}]), Value::Null, "tools[0].type"),
            (
                list.clone(),
                json!({"type": "function", "function": {"name": "g"}}),
                "\"g\", which tools does not list",
            ),
            (json!([]), json!("required"), "tools lists none"),
            (list.clone(), json!("sometimes"), "tool_choice must be"),
        ] {
            let err = Tools::from_request(Some(&tools), Some(&choice)).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn calls_are_read_from_hermes_blocks_and_plain_json() {
        let tools = weather();
        let want = vec![Call {
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }];
        for output in [
            r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#,
            r#"[{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]"#,
            r#"<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#,
        ] {
            assert_eq!(tools.read_calls(output), Some(want.clone()), "{output}");
        }
        for output in [
            "It is sunny.",
            r#"{"name": "other", "arguments": {}}"#,
            "<tool_call>not json</tool_call>",
            // Text first: a stream has sent it as text already.
            r#"Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#,
        ] {
            assert_eq!(tools.read_calls(output), None, "{output}");
        }
        // Held back while it may still be a call.
        assert!(tools.may_be_call("  <tool_"));
        assert!(tools.may_be_call("{\"na"));
        assert!(!tools.may_be_call("It is"));
    }

    #[test]
    fn required_and_named_choices_constrain_to_a_call() {
        let mut tools = weather();
        assert_eq!(tools.grammar(), None);
        tools.choice = Choice::Named("get_weather".into());
        let Some(Grammar::JsonSchema(schema)) = tools.grammar() else {
            panic!("no schema");
        };
        assert_eq!(schema["properties"]["name"]["const"], "get_weather");
        assert_eq!(
            schema["properties"]["arguments"]["required"],
            json!(["city"])
        );
        tools.choice = Choice::Required;
        assert!(
            matches!(tools.grammar(), Some(Grammar::JsonSchema(s)) if s["anyOf"].as_array().is_some_and(|a| a.len() == 1))
        );
    }

    /// Pydantic writes nested models as `$defs` with refs to them; moved under the call's
    /// schema they still resolve, and the grammar constrains to them.
    #[test]
    fn definitions_in_a_tools_schema_still_resolve_under_the_call() {
        let list = json!([{"type": "function", "function": {"name": "book", "parameters": {
            "type": "object",
            "properties": {"guest": {"$ref": "#/$defs/Guest"}},
            "required": ["guest"],
            "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}
        }}}]);
        let tools = Tools::from_request(Some(&list), Some(&json!("required")))
            .unwrap()
            .unwrap();
        let Some(Grammar::JsonSchema(schema)) = tools.grammar() else {
            panic!("no schema");
        };
        assert_eq!(
            schema["anyOf"][0]["properties"]["arguments"]["properties"]["guest"]["$ref"],
            "#/$defs/book__Guest"
        );
        assert_eq!(schema["$defs"]["book__Guest"]["required"], json!(["name"]));
        let tokenizer = crate::tokenizer::Tokenizer::byte_level(&["<|im_end|>"]).unwrap();
        let guides = crate::guide::Guides::new(std::sync::Arc::new(tokenizer), 260);
        let mut guide = guides.compile(&Grammar::JsonSchema(schema)).unwrap();
        let text = r#"{"name": "book", "arguments": {"guest": {"name": "Ann"}}}"#;
        for (i, b) in text.bytes().enumerate() {
            let mut logits = vec![0.0; 260];
            guide.constrain(&mut logits).unwrap();
            assert!(logits[b as usize].is_finite(), "byte {i} of {text} refused");
            guide.advance(u32::from(b)).unwrap();
        }
    }

    #[test]
    fn a_template_without_tools_gets_them_described_and_calls_as_text() {
        let tools = weather();
        let call = PastCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        };
        let conversation = inline(
            vec![
                (Message::new("user", "Weather in Paris?"), Vec::new()),
                (Message::new("assistant", ""), vec![call.clone()]),
                (Message::new("tool", "sunny, 21 C"), Vec::new()),
            ],
            Some(&tools),
        );
        assert_eq!(conversation[0].role, "system");
        assert!(conversation[0].content.contains("\"name\":\"get_weather\""));
        assert_eq!(
            conversation[2].content,
            r#"<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>"#
        );
        assert_eq!(
            conversation[3],
            Message::new("user", "<tool_response>\nsunny, 21 C\n</tool_response>")
        );
        assert_eq!(
            call.for_template()["function"]["arguments"],
            json!({"city": "Paris"})
        );
    }
}
