//! YAML documents with positions: parsing into typed structs and reporting problems by file,
//! YAML path and line.
//!
//! Every config and policy file goes through [`Document::parse`]. Syntax and type errors come
//! from the YAML crate with their line and column; semantic problems found later by a
//! `validate()` carry a YAML path (`tenants[2].limits.memory`), which [`Document::locate`] turns
//! into a line and column using a position tree built from the same text. Pure: no I/O.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

mod lenient;

/// Largest YAML file we accept; policies are small, this guards the daemon's memory.
pub const MAX_YAML_BYTES: usize = 4 << 20;

/// One thing wrong with a config or policy file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// The file (or `<embedded default>`), when known.
    pub file: String,
    /// The YAML path, e.g. `tenants[1].limits.memory`; empty for the whole document.
    pub path: String,
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub column: u64,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one or more files; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{}", if n == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A problem found by a `validate()`: a YAML path and a message, located later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathProblem {
    pub path: String,
    pub message: String,
}

impl PathProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A parsed YAML file: its typed value and the position of every node.
#[derive(Debug)]
pub struct Document<T> {
    pub file: String,
    pub value: T,
    positions: Node,
}

impl<T: DeserializeOwned> Document<T> {
    /// Parses `text` (named `file` in messages) into `T`, or reports every problem in it: a
    /// syntax error stops the reading, but type errors (a wrong type, an unknown field, a
    /// value out of range) are all found in one pass, each with its YAML path.
    pub fn parse(file: &str, text: &str) -> Result<Self, Vec<Problem>> {
        let problem = |line, column, message: String| Problem {
            file: file.to_owned(),
            path: String::new(),
            line,
            column,
            message,
        };
        if text.len() > MAX_YAML_BYTES {
            return Err(vec![problem(
                0,
                0,
                format!("file is {} bytes, more than the {MAX_YAML_BYTES} accepted; split it into several files", text.len()),
            )]);
        }
        let options = serde_saphyr::options! { with_snippet: false };
        // A file with nothing but comments and blank lines (a commented-out policy) is an empty
        // mapping, not an error: every field has a default.
        let only_comments = text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        });
        let text = if only_comments { "{}" } else { text };
        // The tree: every scalar is accepted as it is, a non-finite float included, so one odd
        // value cannot take the lines and columns from every other message.
        let tree_options = serde_saphyr::options! {
            with_snippet: false,
            non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::PassThrough,
        };
        let tree = serde_saphyr::from_str_with_options::<Spanned<Shape>>(text, tree_options)
            .map(|spanned| Node::build(spanned, text));
        let typed: Result<T, _> = serde_saphyr::from_str_with_options(text, options.clone());
        match (typed, tree) {
            (Ok(value), tree) => Ok(Self {
                file: file.to_owned(),
                value,
                positions: tree.unwrap_or(Node::Scalar(Pos::default(), Scalar::Null, None)),
            }),
            (Err(e), tree) => {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                let mut first = problem(line, column, plain_message(&e));
                let tree = match tree {
                    Ok(tree) => tree,
                    Err(e) => {
                        // Not a YAML document that can be read whole: nothing after a syntax
                        // error can be trusted. The strict reading may have stopped earlier, at
                        // a type error; both are true.
                        let (line, column) =
                            e.location().map_or((0, 0), |l| (l.line(), l.column()));
                        let syntax = problem(line, column, plain_message(&e));
                        let mut problems = vec![first];
                        if problems[0].message != syntax.message {
                            problems.push(syntax);
                        }
                        return Err(problems);
                    }
                };
                let every = lenient::type_problems::<T>(&tree)
                    .into_iter()
                    .map(|(path, message)| {
                        let pos = locate(&tree, &path);
                        Problem {
                            file: file.to_owned(),
                            path,
                            line: pos.line,
                            column: pos.column,
                            message,
                        }
                    })
                    .collect::<Vec<_>>();
                if every.is_empty() {
                    // The two readings disagree on this value; the strict one is the truth.
                    first.path = path_at(&tree, Pos { line, column });
                    Err(vec![first])
                } else {
                    Err(every)
                }
            }
        }
    }

    /// Turns problems found by a `validate()` into located problems.
    pub fn locate_all(&self, problems: Vec<PathProblem>) -> Vec<Problem> {
        problems
            .into_iter()
            .map(|p| {
                let pos = self.locate(&p.path);
                Problem {
                    file: self.file.clone(),
                    path: p.path,
                    line: pos.line,
                    column: pos.column,
                    message: p.message,
                }
            })
            .collect()
    }

    /// The position of the node at `path` (`a.b[2].c`), or of its nearest existing ancestor.
    pub fn locate(&self, path: &str) -> Pos {
        locate(&self.positions, path)
    }
}

/// The position of the node at `path` under `root`, or of its nearest existing ancestor.
fn locate(root: &Node, path: &str) -> Pos {
    let mut node = root;
    let mut pos = node.pos();
    for segment in path_segments(path) {
        let next = match (node, segment) {
            (Node::Map(_, entries), Segment::Key(key)) => {
                entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            (Node::Seq(_, items), Segment::Index(i)) => items.get(i),
            _ => None,
        };
        match next {
            Some(child) => {
                node = child;
                pos = node.pos();
            }
            None => break,
        }
    }
    pos
}

/// The error text without the location suffix, which `Problem` prints itself.
fn plain_message(error: &serde_saphyr::Error) -> String {
    let text = error.to_string();
    let text = text.lines().next().unwrap_or_default().trim();
    // The crate appends " at line L, column C"; drop it so locations are printed once.
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    };
    // Its advice is for programmers; say what an operator should do.
    if let Some((head, _)) = text.split_once(", set DuplicateKeyPolicy") {
        return format!("{head}; a key may appear only once in a mapping, remove one");
    }
    if text.starts_with("multiple YAML documents") {
        return "a second YAML document starts here (a `---` line); a config or policy file \
                holds one document: remove the `---`, or move what follows into a file of its own"
            .to_owned();
    }
    if let Some(rest) = text.strip_prefix("budget breached: ") {
        let what = rest.split(" at line").next().unwrap_or(rest);
        return format!(
            "the document is too big to read once its aliases are expanded ({what}); \
             write the values out instead of nesting aliases (`*name`) inside aliased nodes"
        );
    }
    text.to_owned()
}

/// A 1-based line and column; 0 means unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

/// A YAML document as a tree, with the position of every node.
#[derive(Debug)]
enum Node {
    Map(Pos, Vec<(String, Node)>),
    Seq(Pos, Vec<Node>),
    /// A scalar, with its text as written when YAML resolved it to something else.
    Scalar(Pos, Scalar, Option<Box<str>>),
}

/// A scalar as YAML resolved it; a plain `12` may still be read as text, as the strict
/// reading does.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Text(String),
}

/// Raw shape before positions are attached by `Spanned`.
enum Shape {
    Map(Vec<(String, Spanned<Shape>)>),
    Seq(Vec<Spanned<Shape>>),
    Scalar(Scalar),
}

impl Node {
    /// The tree of a parsed document; `text` is the document, for the raw text of plain
    /// scalars (YAML reads a plain `off` as false, but as the text "off" where text is wanted).
    fn build(spanned: Spanned<Shape>, text: &str) -> Self {
        let pos = Pos {
            line: spanned.referenced.line(),
            column: spanned.referenced.column(),
        };
        match spanned.value {
            Shape::Map(entries) => Node::Map(
                pos,
                entries
                    .into_iter()
                    .map(|(k, v)| (k, Node::build(v, text)))
                    .collect(),
            ),
            Shape::Seq(items) => Node::Seq(
                pos,
                items.into_iter().map(|v| Node::build(v, text)).collect(),
            ),
            Shape::Scalar(value @ Scalar::Text(_)) => Node::Scalar(pos, value, None),
            Shape::Scalar(value) => {
                let span = spanned.defined.span();
                let raw = span
                    .byte_offset()
                    .zip(span.byte_len())
                    .and_then(|(at, len)| text.get(at as usize..(at + len) as usize))
                    .map(|raw| raw.trim().into());
                Node::Scalar(pos, value, raw)
            }
        }
    }
}

impl Node {
    fn pos(&self) -> Pos {
        match self {
            Node::Map(p, _) | Node::Seq(p, _) | Node::Scalar(p, ..) => *p,
        }
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<KeyText>()? {
            entries.push((key.0, map.next_value::<Spanned<Shape>>()?));
        }
        Ok(Shape::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Shape>>()? {
            items.push(item);
        }
        Ok(Shape::Seq(items))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Int(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Uint(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Text(v.to_owned())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Scalar(Scalar::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        Shape::deserialize(d)
    }
}

/// A mapping key as text, whatever scalar type YAML gave it.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The YAML path of the last node that starts at or before `at` (the node an error at `at`
/// is in), or empty.
fn path_at(root: &Node, at: Pos) -> String {
    fn walk(node: &Node, path: &mut String, at: Pos, best: &mut (Pos, String)) {
        let pos = node.pos();
        if pos.line == 0 || (pos.line, pos.column) > (at.line, at.column) {
            return;
        }
        if (pos.line, pos.column) >= (best.0.line, best.0.column) {
            *best = (pos, path.clone());
        }
        match node {
            Node::Map(_, entries) => {
                for (key, child) in entries {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    walk(child, path, at, best);
                    path.truncate(len);
                }
            }
            Node::Seq(_, items) => {
                for (i, child) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(child, path, at, best);
                    path.truncate(len);
                }
            }
            Node::Scalar(..) => {}
        }
    }
    if at.line == 0 {
        return String::new();
    }
    let mut best = (Pos::default(), String::new());
    walk(root, &mut String::new(), at, &mut best);
    best.1
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `tenants[2].limits.memory` into keys and indices.
fn path_segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some((index, tail)) = rest.split_once(']') {
            if let Ok(i) = index.parse() {
                out.push(Segment::Index(i));
            }
            rest = tail.strip_prefix('[').unwrap_or(tail);
        }
    }
    out
}

/// Test helpers shared by the modules whose file formats the README documents.
#[cfg(test)]
pub(crate) mod doc_check {
    use std::collections::BTreeSet;

    /// Every key path in a value: `a.b`, with `[]` for list items (all items merged).
    pub fn key_paths(value: &serde_json::Value) -> BTreeSet<String> {
        fn walk(value: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        out.insert(path.clone());
                        walk(v, &path, out);
                    }
                }
                serde_json::Value::Array(items) => {
                    for item in items {
                        walk(item, &format!("{prefix}[]"), out);
                    }
                }
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        walk(value, "", &mut out);
        out
    }

    /// The fenced YAML block between `<!-- NAME:start -->` and `<!-- NAME:end -->` in README.md.
    pub fn readme_yaml(name: &str) -> String {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let start = format!("<!-- {name}:start -->");
        let end = format!("<!-- {name}:end -->");
        let section = readme
            .split_once(&start)
            .and_then(|(_, rest)| rest.split_once(&end))
            .map(|(inside, _)| inside)
            .unwrap_or_else(|| panic!("README.md lacks {start} ... {end}"));
        section
            .trim()
            .strip_prefix("```yaml")
            .and_then(|s| s.strip_suffix("```"))
            .unwrap_or_else(|| panic!("{name} section is not one ```yaml block"))
            .trim_start_matches('\n')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: String,
        #[serde(default)]
        size: Option<crate::units::ByteSize>,
    }

    const TEXT: &str = "items:\n  - name: a\n  - name: b\n    size: 4GiB\n";

    /// The one problem a parse reported.
    fn only<T: std::fmt::Debug>(parsed: Result<T, Vec<Problem>>) -> Problem {
        let mut problems = parsed.unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.remove(0)
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read only to be checked
    struct Limits {
        #[serde(default)]
        count: u32,
        #[serde(default)]
        ids: Vec<crate::policy::IdRangeSpec>,
        #[serde(default)]
        class: Option<crate::policy::PriorityClass>,
        #[serde(default)]
        cpu: Option<f64>,
        #[serde(default)]
        listen: Option<std::net::SocketAddr>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read only to be checked
    struct Entry {
        name: String,
        #[serde(default)]
        limits: Option<Limits>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read only to be checked
    struct Entries {
        #[serde(default)]
        entries: Vec<Entry>,
    }

    #[test]
    fn every_type_problem_is_reported_at_once_with_its_path() {
        let text = "\
entries:
  - name: a
    limits:
      count: -1
      ids: [true, 7, \"1-x\"]
      colour: red
  - name: [b]
    limits:
      class: urgent
      cpu: many
      listen: nowhere
  - limits: {}
";
        let problems = Document::<Entries>::parse("t.yaml", text).unwrap_err();
        let found: Vec<(&str, u64)> = problems.iter().map(|p| (p.path.as_str(), p.line)).collect();
        assert_eq!(
            found,
            [
                ("entries[0].limits.count", 4),
                ("entries[0].limits.ids[0]", 5),
                ("entries[0].limits.ids[2]", 5),
                ("entries[0].limits.colour", 6),
                ("entries[1].name", 7),
                ("entries[1].limits.class", 9),
                ("entries[1].limits.cpu", 10),
                ("entries[1].limits.listen", 11),
                ("entries[2]", 12),
            ],
            "{problems:#?}"
        );
        let message = |path: &str| {
            problems
                .iter()
                .find(|p| p.path == path)
                .map(|p| p.message.clone())
                .unwrap()
        };
        assert!(message("entries[0].limits.count").contains("integer `-1`, expected u32"));
        assert!(message("entries[0].limits.ids[0]")
            .contains("boolean `true`, expected an id such as 1001"));
        assert!(message("entries[0].limits.ids[2]").contains("\"1-x\""));
        assert!(message("entries[0].limits.colour").contains("unknown field `colour`"));
        assert!(message("entries[1].limits.class").contains("unknown variant `urgent`"));
        assert!(message("entries[1].limits.listen").contains("socket address"));
        assert!(message("entries[2]").contains("missing field `name`"));
    }

    #[test]
    fn plain_words_yaml_reads_as_booleans_are_text_where_text_is_wanted() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)] // read only to be checked
        struct Modes {
            mode: crate::config::Isolation,
            name: String,
            count: u32,
        }
        // Only `count` is wrong: `off` is the enum's variant and `yes` a name, as the strict
        // reading takes them, so the lenient one must not call them booleans.
        let problems =
            Document::<Modes>::parse("t.yaml", "mode: off\nname: yes\ncount: x\n").unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["count"], "{problems:?}");
    }

    #[test]
    fn a_non_finite_number_is_named_where_it_is() {
        let problems = Document::<Entries>::parse(
            "t.yaml",
            "entries:\n  - name: a\n    limits: {count: .inf}\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].path.as_str(), problems[0].line),
            ("entries[0].limits.count", 3)
        );
        assert!(problems[0].message.contains("inf"), "{problems:?}");
    }

    #[test]
    fn a_second_document_and_an_alias_bomb_say_what_to_do() {
        let err = only(Document::<Entries>::parse(
            "t.yaml",
            "entries: []\n---\nentries: []\n",
        ));
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("second YAML document"), "{err}");
        let mut bomb = String::from("a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n");
        for i in 1..8 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                vec![format!("*a{p}"); 10].join(", ")
            ));
        }
        let problems = Document::<Entries>::parse("t.yaml", &bomb).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("aliases are expanded")),
            "{problems:?}"
        );
    }

    #[test]
    fn valid_files_read_leniently_have_no_problems() {
        // The lenient reading must agree with the strict one on what is valid, or it would
        // report problems that are not there. Every YAML file the project ships is valid.
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut files = Vec::new();
        for dir in [
            "runtime/dist",
            "cgroup-policies",
            "cgroup-policies/examples",
        ] {
            for entry in std::fs::read_dir(format!("{root}/{dir}"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path.display().to_string());
                }
            }
        }
        let mut texts: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        texts.push(doc_check::readme_yaml("config-reference"));
        texts.push(doc_check::readme_yaml("policy-reference"));
        let mut checked = 0;
        for text in texts {
            let tree = Node::build(
                serde_saphyr::from_str::<Spanned<Shape>>(&text).unwrap(),
                &text,
            );
            if serde_saphyr::from_str::<crate::config::DaemonConfig>(&text).is_ok() {
                assert_eq!(
                    lenient::type_problems::<crate::config::DaemonConfig>(&tree),
                    []
                );
                checked += 1;
            }
            if serde_saphyr::from_str::<crate::policy::schema::PolicyFile>(&text).is_ok() {
                assert_eq!(
                    lenient::type_problems::<crate::policy::schema::PolicyFile>(&tree),
                    []
                );
                checked += 1;
            }
        }
        assert!(checked >= 5, "only {checked} files checked");
    }

    #[test]
    fn locates_nested_paths() {
        let doc = Document::<Doc>::parse("t.yaml", TEXT).unwrap();
        assert_eq!(doc.value.items.len(), 2);
        assert_eq!(doc.value.items[1].name, "b");
        assert_eq!(doc.value.items[1].size.map(|s| s.bytes()), Some(4 << 30));
        assert_eq!(doc.locate("items[1].size").line, 4);
        assert_eq!(doc.locate("items[1].name").line, 3);
        assert_eq!(doc.locate("items[0]").line, 2);
        // A path that does not exist resolves to its nearest ancestor.
        assert_eq!(doc.locate("items[1].missing").line, 3);
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let err = only(Document::<Doc>::parse(
            "t.yaml",
            "items:\n  - name: a\n   bad: [\n",
        ));
        assert!(err.line >= 2, "{err}");
        assert!(err.column > 0, "{err}");
        assert_eq!(err.file, "t.yaml");
    }

    #[test]
    fn unknown_fields_and_bad_sizes_are_located() {
        let err = only(Document::<Doc>::parse(
            "t.yaml",
            "items:\n  - name: a\n    colour: red\n",
        ));
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("colour"), "{err}");
        let err = only(Document::<Doc>::parse(
            "t.yaml",
            "items:\n  - name: a\n    size: 10XB\n",
        ));
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("10XB"), "{err}");
        // A type error names the field it is in.
        assert_eq!(err.path, "items[0].size", "{err}");
        let err = only(Document::<Doc>::parse(
            "t.yaml",
            "items:\n  - name: a\n  - name: [1]\n",
        ));
        assert_eq!((err.path.as_str(), err.line), ("items[1].name", 3), "{err}");
    }

    #[test]
    fn empty_or_comment_only_text_is_an_empty_document() {
        for text in [
            "",
            "  \n",
            "# all commented out\n# items:\n#  - name: a\n",
            "---\n# nothing\n",
        ] {
            let doc = Document::<Doc>::parse("t.yaml", text)
                .unwrap_or_else(|e| panic!("{text:?}: {e:?}"));
            assert!(doc.value.items.is_empty());
        }
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = only(Document::<Doc>::parse("t.yaml", "items: []\nitems: []\n"));
        assert_eq!(err.line, 2, "{err}");
        assert!(
            err.message
                .contains("duplicate mapping key: items; a key may appear only once"),
            "{err}"
        );
    }
}
