//! JSON <-> `google.protobuf.Struct`. Numbers become doubles (as in every
//! Struct); on the way out, integral doubles within +-2^53 print as integers.

use prost_types::{value::Kind, ListValue, Struct, Value};
use serde_json::{Map, Number, Value as Json};

pub fn to_value(v: &Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(to_struct(o)),
    };
    Value { kind: Some(kind) }
}

pub fn to_struct(o: &Map<String, Json>) -> Struct {
    Struct {
        fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
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

    #[test]
    fn round_trip_keeps_integers_integral() {
        let j = json!({"a": 1, "b": [true, null, "x", 1.5], "c": {"d": -3}});
        let s = to_struct(j.as_object().unwrap());
        assert_eq!(Json::Object(from_struct_map(&s)), j);
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = to_struct(
            json!({"a": "1", "b": "2", "addr": {"city": "Oslo", "zip": "0150"}, "n": [1]})
                .as_object()
                .unwrap(),
        );
        let p = to_struct(
            json!({"a": null, "c": "3", "addr": {"zip": null, "street": "Main 1"}, "n": {"x": 1}})
                .as_object()
                .unwrap(),
        );
        merge_patch(&mut t, &p);
        assert_eq!(
            Json::Object(from_struct_map(&t)),
            json!({"b": "2", "c": "3", "addr": {"city": "Oslo", "street": "Main 1"}, "n": {"x": 1}})
        );
    }
}
