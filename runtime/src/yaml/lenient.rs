//! The lenient reading: every type error in a document, not only the first.
//!
//! Serde stops at the first error, so a file with three typos takes three rounds of fixing.
//! Here the document's tree is deserialized into the target type again and again; after each
//! error the node it came from is repaired (first replaced by a neutral value of whatever type
//! is asked for, then, if that is not enough, removed as if it were not written) and the reading
//! starts over, so each round finds the next problem. Rounds and problems are bounded. Values
//! read this way are thrown away: the strict reading in [`super::Document::parse`] is the one
//! that produces configuration.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::value::StrDeserializer;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor,
};

use super::{Node, Scalar};

/// More problems than this are not worth reading in one go.
const MAX_PROBLEMS: usize = 50;
/// Each problem takes at most two repairs, plus the silent ones behind a removal.
const MAX_ROUNDS: usize = 4 * MAX_PROBLEMS;
/// Nodes read over all rounds: a big file gets fewer rounds, so a reading stays well under a
/// second however large the file.
const MAX_NODE_READS: usize = 20_000_000;

/// Every type error in `root` read as `T`, as (YAML path, message), in the order found.
pub(super) fn type_problems<T: DeserializeOwned>(root: &Node) -> Vec<(String, String)> {
    let mut repairs: BTreeMap<String, Repair> = BTreeMap::new();
    let mut problems: Vec<(String, String)> = Vec::new();
    let rounds = (MAX_NODE_READS / count_nodes(root).max(1)).clamp(1, MAX_ROUNDS);
    for _ in 0..rounds {
        let reading = Reading {
            repairs: &repairs,
            failed_at: RefCell::new(None),
        };
        let result = T::deserialize(Cursor::new(root, String::new(), &reading));
        let Err(error) = result else { break };
        let path = reading.failed_at.into_inner().unwrap_or_default();
        // A field we removed is now missing from its parent: that is our doing, not the
        // file's, so it is not reported; the parent is repaired instead.
        let ours = missing_field(&error.0)
            .is_some_and(|field| repairs.get(&join(&path, field)) == Some(&Repair::Remove));
        let next = match repairs.get(&path) {
            None => Repair::Neutral,
            Some(Repair::Neutral) if !path.is_empty() => Repair::Remove,
            // Removed and still failing, or the whole document: nothing more can be learnt.
            Some(_) => break,
        };
        if !ours && !repairs.contains_key(&path) {
            problems.push((path.clone(), error.0));
            if problems.len() >= MAX_PROBLEMS {
                break;
            }
        }
        repairs.insert(path, next);
    }
    problems
}

fn count_nodes(node: &Node) -> usize {
    match node {
        Node::Map(_, entries) => 1 + entries.iter().map(|(_, n)| count_nodes(n)).sum::<usize>(),
        Node::Seq(_, items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Node::Scalar(..) => 1,
    }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// What to do with a node that failed in an earlier round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    /// Read it as a neutral value of the type asked for (0, "", false, empty).
    Neutral,
    /// Leave it out of its mapping or sequence.
    Remove,
}

/// One round: the repairs so far, and where this round's error came from.
struct Reading<'a> {
    repairs: &'a BTreeMap<String, Repair>,
    failed_at: RefCell<Option<String>>,
}

impl Reading<'_> {
    /// Errors travel up from the deepest node that failed; the first to record wins.
    fn failed(&self, path: &str) {
        let mut failed_at = self.failed_at.borrow_mut();
        if failed_at.is_none() {
            *failed_at = Some(path.to_owned());
        }
    }

    fn repair(&self, path: &str) -> Option<Repair> {
        self.repairs.get(path).copied()
    }
}

/// An error while reading: serde's message, untouched.
#[derive(Debug)]
pub(super) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Self(message.to_string())
    }
}

/// The type a deserializer was asked for, which decides how a scalar or a repaired node reads.
#[derive(Debug, Clone, Copy)]
enum Want {
    Any,
    Bool,
    Signed,
    Unsigned,
    Float,
    Text,
    Bytes,
    Option,
    Unit,
    Newtype,
    Seq,
    Map,
    Enum,
    Ignored,
}

/// A node of the tree, at its YAML path.
struct Cursor<'r, 'a> {
    node: &'a Node,
    path: String,
    reading: &'r Reading<'r>,
}

impl<'r, 'a> Cursor<'r, 'a> {
    fn new(node: &'a Node, path: String, reading: &'r Reading<'r>) -> Self {
        Self {
            node,
            path,
            reading,
        }
    }

    fn read<'de, V: Visitor<'de>>(self, want: Want, visitor: V) -> Result<V::Value, Error> {
        let reading = self.reading;
        let path = self.path.clone();
        let result = if reading.repair(&self.path) == Some(Repair::Neutral) {
            neutral(want, visitor, self)
        } else {
            self.read_node(want, visitor)
        };
        if result.is_err() {
            reading.failed(&path);
        }
        result
    }

    fn read_node<'de, V: Visitor<'de>>(self, want: Want, visitor: V) -> Result<V::Value, Error> {
        match (self.node, want) {
            (Node::Scalar(_, Scalar::Null, _), Want::Option) => visitor.visit_none(),
            (_, Want::Option) => visitor.visit_some(self),
            (_, Want::Newtype) => visitor.visit_newtype_struct(self),
            (_, Want::Ignored) => visitor.visit_unit(),
            (Node::Map(_, entries), _) => visitor.visit_map(Entries {
                entries: entries.iter(),
                parent: &self.path,
                reading: self.reading,
                value: None,
            }),
            (Node::Seq(_, items), _) => visitor.visit_seq(Items {
                items: items.iter().enumerate(),
                parent: &self.path,
                reading: self.reading,
            }),
            (Node::Scalar(_, scalar, raw), want) => {
                read_scalar(scalar, raw.as_deref(), want, visitor)
            }
        }
    }
}

/// A scalar read the way the strict YAML reading reads it: plain numbers and booleans may be
/// taken as text, and text that spells a number may be taken as that number.
fn read_scalar<'de, V: Visitor<'de>>(
    scalar: &Scalar,
    raw: Option<&str>,
    want: Want,
    visitor: V,
) -> Result<V::Value, Error> {
    // Where text is wanted, a plain scalar is its text as written (`off`, not false).
    if let (Some(raw), Want::Text | Want::Enum) = (raw, want) {
        if !matches!(scalar, Scalar::Null) {
            return read_scalar(&Scalar::Text(raw.to_owned()), None, want, visitor);
        }
    }
    match (scalar, want) {
        (Scalar::Text(text), Want::Enum) => visitor.visit_enum(StrDeserializer::<Error>::new(text)),
        (Scalar::Text(text), Want::Bool) => match text.as_str() {
            "true" => visitor.visit_bool(true),
            "false" => visitor.visit_bool(false),
            _ => visitor.visit_str(text),
        },
        (Scalar::Text(text), Want::Signed | Want::Unsigned | Want::Float) => {
            if let Ok(n) = text.parse::<u64>() {
                visitor.visit_u64(n)
            } else if let Ok(n) = text.parse::<i64>() {
                visitor.visit_i64(n)
            } else if let Ok(n) = text.parse::<f64>() {
                visitor.visit_f64(n)
            } else {
                visitor.visit_str(text)
            }
        }
        (Scalar::Bool(b), Want::Text) => visitor.visit_str(&b.to_string()),
        (Scalar::Int(n), Want::Text) => visitor.visit_str(&n.to_string()),
        (Scalar::Uint(n), Want::Text) => visitor.visit_str(&n.to_string()),
        (Scalar::Float(n), Want::Text) => visitor.visit_str(&n.to_string()),
        (Scalar::Null, _) => visitor.visit_unit(),
        (Scalar::Bool(b), _) => visitor.visit_bool(*b),
        (Scalar::Int(n), _) => visitor.visit_i64(*n),
        (Scalar::Uint(n), _) => visitor.visit_u64(*n),
        (Scalar::Float(n), _) => visitor.visit_f64(*n),
        (Scalar::Text(text), _) => visitor.visit_str(text),
    }
}

/// A repaired node: a neutral value of the type asked for. An enum has none, so it fails
/// again and is removed next round.
fn neutral<'de, V: Visitor<'de>>(
    want: Want,
    visitor: V,
    at: Cursor<'_, '_>,
) -> Result<V::Value, Error> {
    match want {
        Want::Bool => visitor.visit_bool(false),
        Want::Signed => visitor.visit_i64(0),
        Want::Unsigned => visitor.visit_u64(0),
        Want::Float => visitor.visit_f64(0.0),
        Want::Text => visitor.visit_str(""),
        Want::Bytes => visitor.visit_bytes(&[]),
        Want::Option => visitor.visit_none(),
        Want::Newtype => visitor.visit_newtype_struct(at),
        Want::Seq => visitor.visit_seq(Nothing),
        Want::Map => visitor.visit_map(Nothing),
        Want::Any | Want::Unit | Want::Ignored => visitor.visit_unit(),
        Want::Enum => Err(de::Error::custom("no neutral value for an enum")),
    }
}

/// A mapping's entries, each at its path, leaving out removed ones.
struct Entries<'r, 'a> {
    entries: std::slice::Iter<'a, (String, Node)>,
    parent: &'a str,
    reading: &'r Reading<'r>,
    value: Option<(&'a Node, String)>,
}

impl<'de> MapAccess<'de> for Entries<'_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        for (key, node) in self.entries.by_ref() {
            let path = join(self.parent, key);
            if self.reading.repair(&path) == Some(Repair::Remove) {
                continue;
            }
            // An unknown field fails on its key: the problem is at that key's path.
            let read = seed.deserialize(StrDeserializer::<Error>::new(key));
            if read.is_err() {
                self.reading.failed(&path);
            }
            self.value = Some((node, path));
            return read.map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.value.take() {
            Some((node, path)) => seed.deserialize(Cursor::new(node, path, self.reading)),
            None => Err(de::Error::custom("a value was asked for before its key")),
        }
    }
}

/// A sequence's items, each at its path (by its index in the file), leaving out removed ones.
struct Items<'r, 'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    parent: &'a str,
    reading: &'r Reading<'r>,
}

impl<'de> SeqAccess<'de> for Items<'_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        for (i, node) in self.items.by_ref() {
            let path = format!("{}[{i}]", self.parent);
            if self.reading.repair(&path) == Some(Repair::Remove) {
                continue;
            }
            return seed
                .deserialize(Cursor::new(node, path, self.reading))
                .map(Some);
        }
        Ok(None)
    }
}

/// An empty mapping or sequence.
struct Nothing;

impl<'de> MapAccess<'de> for Nothing {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, _: K) -> Result<Option<K::Value>, Error> {
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, _: V) -> Result<V::Value, Error> {
        Err(de::Error::custom("an empty mapping has no values"))
    }
}

impl<'de> SeqAccess<'de> for Nothing {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        _: T,
    ) -> Result<Option<T::Value>, Error> {
        Ok(None)
    }
}

macro_rules! wants {
    ($($method:ident => $want:expr),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.read($want, visitor)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for Cursor<'_, '_> {
    type Error = Error;

    wants! {
        deserialize_any => Want::Any,
        deserialize_bool => Want::Bool,
        deserialize_i8 => Want::Signed,
        deserialize_i16 => Want::Signed,
        deserialize_i32 => Want::Signed,
        deserialize_i64 => Want::Signed,
        deserialize_i128 => Want::Signed,
        deserialize_u8 => Want::Unsigned,
        deserialize_u16 => Want::Unsigned,
        deserialize_u32 => Want::Unsigned,
        deserialize_u64 => Want::Unsigned,
        deserialize_u128 => Want::Unsigned,
        deserialize_f32 => Want::Float,
        deserialize_f64 => Want::Float,
        deserialize_char => Want::Text,
        deserialize_str => Want::Text,
        deserialize_string => Want::Text,
        deserialize_identifier => Want::Text,
        deserialize_bytes => Want::Bytes,
        deserialize_byte_buf => Want::Bytes,
        deserialize_option => Want::Option,
        deserialize_unit => Want::Unit,
        deserialize_seq => Want::Seq,
        deserialize_map => Want::Map,
        deserialize_ignored_any => Want::Ignored,
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.read(Want::Unit, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.read(Want::Newtype, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.read(Want::Seq, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.read(Want::Seq, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.read(Want::Map, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.read(Want::Enum, visitor)
    }
}
