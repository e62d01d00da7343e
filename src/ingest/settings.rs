//! Visibility settings (CONTRACT §5): missing fields are false / empty.

use super::fields::{self, invalid, Obj};
use super::Rejection;
use crate::model::value::Value;
use crate::model::{Settings, TypeRef};
use serde_json::json;

fn flag(o: &Obj, key: &str) -> Result<bool, Rejection> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(
            key,
            format_args!("must be a boolean, got {}", fields::kind_name(v)),
        )),
    }
}

fn types(o: &Obj, key: &str) -> Result<Vec<TypeRef>, Rejection> {
    let items = match o.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(invalid(
                key,
                format_args!("must be an array, got {}", fields::kind_name(v)),
            ))
        }
    };
    let mut out: Vec<TypeRef> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("{key}[{i}]");
        let Value::Object(m) = item else {
            return Err(invalid(&p, "must be an object with source and type"));
        };
        let source = fields::req_str(m, "source", &format!("{p}.source"))?;
        let kind = fields::req_str(m, "type", &format!("{p}.type"))?;
        out.push(TypeRef::new(source, kind));
    }
    out.sort_by(|a, b| (&a.source, &a.r#type).cmp(&(&b.source, &b.r#type)));
    out.dedup();
    Ok(out)
}

pub fn settings_from_json(o: &Obj) -> Result<Settings, Rejection> {
    Ok(Settings {
        zendesk_events: flag(o, "zendesk_events")?,
        events_api: flag(o, "events_api")?,
        profiles_api: flag(o, "profiles_api")?,
        shown_event_types: types(o, "shown_event_types")?,
        shown_profile_types: types(o, "shown_profile_types")?,
    })
}

pub fn settings_to_json(s: &Settings) -> serde_json::Value {
    let list = |v: &[TypeRef]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|t| json!({"source": t.source, "type": t.r#type}))
            .collect()
    };
    json!({
        "zendesk_events": s.zendesk_events,
        "events_api": s.events_api,
        "profiles_api": s.profiles_api,
        "shown_event_types": list(&s.shown_event_types),
        "shown_profile_types": list(&s.shown_profile_types),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: &serde_json::Value) -> Obj<'static> {
        v.as_object().expect("an object").into()
    }

    #[test]
    fn missing_fields_default_and_types_are_sorted() {
        let v = json!({"zendesk_events": true, "shown_event_types": [
            {"source": "z", "type": "b"}, {"source": "a", "type": "c"}, {"source": "z", "type": "b"}]});
        let s = settings_from_json(&obj(&v)).unwrap();
        assert!(s.zendesk_events && !s.events_api && !s.profiles_api);
        assert_eq!(
            s.shown_event_types,
            vec![TypeRef::new("a", "c"), TypeRef::new("z", "b")]
        );
        assert!(s.shown_profile_types.is_empty());
        let back = settings_to_json(&s);
        assert_eq!(back["events_api"], json!(false));
    }

    #[test]
    fn bad_settings() {
        for v in [
            json!({"zendesk_events": "yes"}),
            json!({"shown_event_types": {}}),
            json!({"shown_event_types": [{"source": "a"}]}),
            json!({"shown_profile_types": [1]}),
        ] {
            assert!(settings_from_json(&obj(&v)).is_err(), "{v}");
        }
    }
}
