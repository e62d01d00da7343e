//! JSON <-> `google.protobuf.Struct`. Numbers become doubles (as in every
//! Struct); on the way out, integral doubles within +-2^53 print as integers.
//! Inputs come as `value::Value` (parsed from a record), outputs go as
//! `serde_json::Value`.

use super::value::{Obj, Value as In};
use prost_types::{value::Kind, ListValue, Struct, Value};
use serde_json::{Map, Number, Value as Json};

pub fn to_value(v: &In) -> Value {
    let kind = match v {
        In::Null => Kind::NullValue(0),
        In::Bool(b) => Kind::BoolValue(*b),
        In::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        In::String(s) => Kind::StringValue(s.to_string()),
        In::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        In::Object(o) => Kind::StructValue(to_struct(o)),
    };
    Value { kind: Some(kind) }
}

pub fn to_struct(o: &Obj) -> Struct {
    Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.to_string(), to_value(v)))
            .collect(),
    }
}

/// `to_struct(o).encode_to_vec()`, written straight from the JSON (no
/// `Struct` maps built, no strings copied twice).
pub fn encode_struct(o: &Obj) -> Vec<u8> {
    let mut buf = Vec::with_capacity(struct_len(o));
    put_struct(o, &mut buf);
    buf
}

// Wire tags: Struct.fields = 1 (map entries: key = 1, value = 2); Value:
// null = 1, number = 2, string = 3, bool = 4, struct = 5, list = 6;
// ListValue.values = 1. A oneof field is written even when it is zero.
const LEN: u8 = 2;
const fn tag(field: u8, wire: u8) -> u8 {
    field << 3 | wire
}

fn varint_len(n: usize) -> usize {
    prost::encoding::encoded_len_varint(n as u64)
}

/// Length-delimited field: tag, length, body.
fn field_len(body: usize) -> usize {
    1 + varint_len(body) + body
}

fn entry_len(k: &str, v: &In) -> usize {
    (if k.is_empty() { 0 } else { field_len(k.len()) }) + field_len(value_len(v))
}

fn struct_len(o: &Obj) -> usize {
    o.iter().map(|(k, v)| field_len(entry_len(k, v))).sum()
}

fn list_len(a: &[In]) -> usize {
    a.iter().map(|v| field_len(value_len(v))).sum()
}

/// Length of a `Value` message's body.
fn value_len(v: &In) -> usize {
    match v {
        In::Null => 2,
        In::Bool(_) => 2,
        In::Number(_) => 9,
        In::String(s) => field_len(s.len()),
        In::Array(a) => field_len(list_len(a)),
        In::Object(o) => field_len(struct_len(o)),
    }
}

fn put_len(field: u8, len: usize, buf: &mut Vec<u8>) {
    buf.push(tag(field, LEN));
    prost::encoding::encode_varint(len as u64, buf);
}

/// The entries in `Struct` order: keys sorted, as `Obj` keeps them.
fn put_struct(o: &Obj, buf: &mut Vec<u8>) {
    for (k, v) in o.iter() {
        put_entry(k, v, buf);
    }
}

fn put_entry(k: &str, v: &In, buf: &mut Vec<u8>) {
    put_len(1, entry_len(k, v), buf);
    if !k.is_empty() {
        put_len(1, k.len(), buf);
        buf.extend_from_slice(k.as_bytes());
    }
    put_len(2, value_len(v), buf);
    put_value(v, buf);
}

fn put_value(v: &In, buf: &mut Vec<u8>) {
    match v {
        In::Null => buf.extend_from_slice(&[tag(1, 0), 0]),
        In::Bool(b) => buf.extend_from_slice(&[tag(4, 0), u8::from(*b)]),
        In::Number(n) => {
            buf.push(tag(2, 1));
            buf.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
        }
        In::String(s) => {
            put_len(3, s.len(), buf);
            buf.extend_from_slice(s.as_bytes());
        }
        In::Array(a) => {
            put_len(6, list_len(a), buf);
            for v in a {
                put_len(1, value_len(v), buf);
                put_value(v, buf);
            }
        }
        In::Object(o) => {
            put_len(5, struct_len(o), buf);
            put_struct(o, buf);
        }
    }
}

pub fn from_value(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => Json::Object(from_struct_map(s)),
    }
}

fn number(n: f64) -> Json {
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT {
        Json::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map(Json::Number).unwrap_or(Json::Null)
    }
}

pub fn from_struct_map(s: &Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), from_value(v)))
        .collect()
}

/// A Struct as a JSON object; `None` is `{}`.
pub fn from_struct(s: &Option<Struct>) -> Json {
    Json::Object(s.as_ref().map(from_struct_map).unwrap_or_default())
}

/// RFC 7386 JSON merge patch, applied to Struct values.
pub fn merge_patch(target: &mut Struct, patch: &Struct) {
    for (k, v) in &patch.fields {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => {
                target.fields.remove(k);
            }
            Some(Kind::StructValue(p)) => {
                let entry = target
                    .fields
                    .entry(k.clone())
                    .or_insert(Value { kind: None });
                match &mut entry.kind {
                    Some(Kind::StructValue(t)) => merge_patch(t, p),
                    _ => {
                        let mut t = Struct::default();
                        merge_patch(&mut t, p);
                        entry.kind = Some(Kind::StructValue(t));
                    }
                }
            }
            _ => {
                target.fields.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(j: &Json) -> Obj<'static> {
        j.as_object().expect("an object").into()
    }

    #[test]
    fn round_trip_keeps_integers_integral() {
        let j = json!({"a": 1, "b": [true, null, "x", 1.5], "c": {"d": -3}});
        let s = to_struct(&obj(&j));
        assert_eq!(Json::Object(from_struct_map(&s)), j);
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Json::String),
            "[a-z]{0,200}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Json::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..8)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn struct_bytes_are_what_prost_encodes(
            m in proptest::collection::btree_map(".{0,8}", json_value(), 0..12)
        ) {
            use prost::Message;
            let j = Json::Object(m.into_iter().collect());
            let o = obj(&j);
            proptest::prop_assert_eq!(encode_struct(&o), to_struct(&o).encode_to_vec());
            // Parsed from its text, the object `serde_json` parses, and
            // its bytes (its numbers as `serde_json` reads them).
            let text = j.to_string();
            let parsed = match crate::model::value::from_str(&text).unwrap() {
                In::Object(p) => p,
                _ => unreachable!(),
            };
            let theirs: Json = serde_json::from_str(&text).unwrap();
            let theirs = obj(&theirs);
            proptest::prop_assert_eq!(&parsed, &theirs);
            proptest::prop_assert_eq!(encode_struct(&parsed), encode_struct(&theirs));
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = to_struct(&obj(
            &json!({"a": "1", "b": "2", "addr": {"city": "Oslo", "zip": "0150"}, "n": [1]}),
        ));
        let p = to_struct(&obj(
            &json!({"a": null, "c": "3", "addr": {"zip": null, "street": "Main 1"}, "n": {"x": 1}}),
        ));
        merge_patch(&mut t, &p);
        assert_eq!(
            Json::Object(from_struct_map(&t)),
            json!({"b": "2", "c": "3", "addr": {"city": "Oslo", "street": "Main 1"}, "n": {"x": 1}})
        );
    }
}
