//! A JSON value as the input validators read it: strings borrowed from the
//! record's bytes (copied only when they hold escapes), an object's members
//! in one vector sorted by key. Parsing a record into `serde_json::Value`
//! allocated every key and string and a tree of map nodes, 6–7% of the CPU
//! of a full-speed run (BENCHMARKS.md, item 54); this holds the same
//! information with one allocation per object and array.
//!
//! It reads like `serde_json`'s: `Obj::get`, the same variants, members in
//! key order, the last of repeated keys kept; and it serializes as
//! `serde_json::Value` does (event ids derived from it are unchanged).

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;
use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Obj<'a>),
}

/// A JSON object: members sorted by key, keys unique.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Obj<'a> {
    members: Vec<(Cow<'a, str>, Value<'a>)>,
}

impl<'a> Obj<'a> {
    pub fn new() -> Obj<'a> {
        Obj::default()
    }

    /// From members in any order; of repeated keys the last is kept (as
    /// `serde_json::Map` does).
    pub fn from_members(mut members: Vec<(Cow<'a, str>, Value<'a>)>) -> Obj<'a> {
        if !members.is_sorted_by(|a, b| a.0 < b.0) {
            // Reversed, a stable sort puts the last of equal keys first;
            // `dedup_by` keeps the first of each run.
            members.reverse();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            members.dedup_by(|later, first| later.0 == first.0);
        }
        Obj { members }
    }

    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.members
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.members[i].1)
    }

    /// Sets `key` (replacing its value if present).
    pub fn insert(&mut self, key: impl Into<Cow<'a, str>>, value: Value<'a>) {
        let key = key.into();
        match self.members.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.members[i].1 = value,
            Err(i) => self.members.insert(i, (key, value)),
        }
    }

    /// Members in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value<'a>)> {
        self.members.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// An owned copy of a `serde_json` value (numbers as they are).
impl From<&serde_json::Value> for Value<'static> {
    fn from(v: &serde_json::Value) -> Value<'static> {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Number(n.clone()),
            serde_json::Value::String(s) => Value::String(Cow::Owned(s.clone())),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(Value::from).collect()),
            serde_json::Value::Object(m) => Value::Object(m.into()),
        }
    }
}

impl From<&serde_json::Map<String, serde_json::Value>> for Obj<'static> {
    fn from(m: &serde_json::Map<String, serde_json::Value>) -> Obj<'static> {
        Obj::from_members(
            m.iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), Value::from(v)))
                .collect(),
        )
    }
}

/// Parses one JSON text (with `serde_json`: the same syntax, nesting limit
/// and error messages).
pub fn from_str(text: &str) -> serde_json::Result<Value<'_>> {
    serde_json::from_str(text)
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value<'de>, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value<'de>, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value<'de>, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value<'de>, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s)))
    }

    fn visit_unit<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value<'de>, D::Error> {
        Deserialize::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(k) = map.next_key_seed(KeySeed)? {
            members.push((k, map.next_value()?));
        }
        Ok(Value::Object(Obj::from_members(members)))
    }
}

/// An object key, borrowed when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => n.serialize(s),
            Value::String(v) => s.serialize_str(v),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Object(o) => o.serialize(s),
        }
    }
}

impl Serialize for Obj<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed both ways, the two serialize to the same bytes.
    fn same_as_serde_json(text: &str) {
        let ours = from_str(text).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::to_string(&ours).unwrap(),
            serde_json::to_string(&theirs).unwrap(),
            "{text}"
        );
    }

    #[test]
    fn reads_and_writes_as_serde_json_does() {
        for text in [
            r#"{"b":1,"a":[true,null,-2,3.5,1e300,18446744073709551615,-9223372036854775808],"c":{"z":"\u00e9\n\"","y":{}}}"#,
            r#"{"k":1,"k":2,"a":0,"k":3}"#,
            r#"{"":"empty key","é":"non-ascii","\u0041":"escaped key","A":"plain"}"#,
            r#"[1,"two",{"three":3}]"#,
            r#""just a string""#,
            r#"{"n":0.1,"m":-0.0,"big":123456789012345678901234567890}"#,
        ] {
            same_as_serde_json(text);
        }
    }

    #[test]
    fn members_sorted_last_of_repeated_keys_kept() {
        let Value::Object(o) = from_str(r#"{"k":1,"b":true,"k":2,"a":null,"k":3}"#).unwrap() else {
            panic!("an object");
        };
        let keys: Vec<&str> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "k"]);
        assert_eq!(o.get("k"), Some(&Value::Number(3.into())));
        assert_eq!(o.get("b"), Some(&Value::Bool(true)));
        assert_eq!(o.get("missing"), None);
    }

    #[test]
    fn strings_borrowed_unless_escaped() {
        let text = r#"{"plain":"abc","esc":"a\tb"}"#;
        let Value::Object(o) = from_str(text).unwrap() else {
            panic!("an object");
        };
        assert!(matches!(
            o.get("plain"),
            Some(Value::String(Cow::Borrowed("abc")))
        ));
        assert!(matches!(o.get("esc"), Some(Value::String(Cow::Owned(s))) if s == "a\tb"));
    }

    #[test]
    fn insert_keeps_order() {
        let mut o = Obj::new();
        o.insert("b", Value::Null);
        o.insert("a", Value::Bool(false));
        o.insert("b", Value::Bool(true));
        let keys: Vec<&str> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(o.get("b"), Some(&Value::Bool(true)));
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"a":false,"b":true}"#
        );
    }

    #[test]
    fn errors_as_serde_json_reports_them() {
        for text in ["{not json", "{\"a\":1} trailing", "[1,", ""] {
            let ours = from_str(text).unwrap_err().to_string();
            let theirs = serde_json::from_str::<serde_json::Value>(text)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs, "{text}");
        }
    }
}
