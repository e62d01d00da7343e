//! Profile operations (CONTRACT §3.3): put, patch (RFC 7386), delete.

use super::events::{profile_ref, unresolvable};
use super::fields::{self, invalid, Obj};
use super::{Normalized, Rejection};
use crate::model::value::Value;
use crate::model::{json, ProfileOp, ProfileOpKind};

pub fn profile_op(o: &Obj) -> Result<Normalized, Rejection> {
    let op = match fields::req_str(o, "op", "op")? {
        "put" => ProfileOpKind::Put,
        "patch" => ProfileOpKind::Patch,
        "delete" => ProfileOpKind::Delete,
        other => {
            return Err(invalid(
                "op",
                format_args!("must be \"put\", \"patch\" or \"delete\", got {other:?}"),
            ))
        }
    };
    let user_id = fields::user_id(o, "user_id", "user_id", false)?;
    let profile = profile_ref(o)?;
    let p = fields::req_obj(o, "profile", "profile")?;
    let mut out = ProfileOp {
        op: op as i32,
        source: profile.source,
        r#type: profile.r#type,
        identifiers: profile.identifiers,
        name: None,
        attributes: None,
        patch: None,
    };
    match op {
        ProfileOpKind::Put => {
            out.name = profile.name;
            let empty = Obj::new();
            let attrs = fields::opt_free_obj(p, "attributes", "profile.attributes")?;
            out.attributes = Some(json::to_struct(attrs.unwrap_or(&empty)));
        }
        ProfileOpKind::Patch => {
            let mut patch = Obj::new();
            if let Some(name) = p.get("name") {
                if !matches!(name, Value::Null | Value::String(_)) {
                    return Err(invalid("profile.name", "must be a string or null"));
                }
                patch.insert("name", name.clone());
            }
            if let Some(attrs) = p.get("attributes") {
                fields::opt_free_obj(p, "attributes", "profile.attributes")?;
                patch.insert("attributes", attrs.clone());
            }
            out.patch = Some(json::to_struct(&patch));
        }
        ProfileOpKind::Delete | ProfileOpKind::Unspecified => {}
    }
    if user_id.is_none() && out.identifiers.is_empty() {
        return Err(unresolvable());
    }
    Ok(Normalized::Profile { user_id, op: out })
}

#[cfg(test)]
mod tests {
    use crate::ingest::{normalize, InputKind, Limits, Normalized, Rejection};
    use serde_json::{json, Value};

    fn op(v: Value) -> Result<Normalized, crate::ingest::Rejection> {
        normalize(
            InputKind::Profiles,
            v.to_string().as_bytes(),
            0,
            Limits::default(),
        )
    }
    fn code(v: Value) -> &'static str {
        op(v).unwrap_err().code.as_str()
    }
    fn prof(extra: Value) -> Value {
        let mut p = json!({"source": "shopify", "type": "customer",
            "identifiers": [{"type": "email", "value": "j@x"}]});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    /// `MAX_NESTING` levels of attributes decode everywhere: as the
    /// records-log entry, the stored profile and the published snapshot
    /// (protobuf decoders stop at 100 levels); one more is refused.
    #[test]
    fn attributes_nest_at_most_max_nesting_levels() {
        use crate::ingest::fields::MAX_NESTING;
        use prost::Message;
        let nested = |levels: usize| {
            let mut v = json!("leaf");
            for i in 1..levels {
                v = if i % 3 == 0 {
                    json!([v])
                } else {
                    json!({ "k": v })
                };
            }
            json!({ "a": v })
        };
        for kind in ["put", "patch"] {
            let deepest = op(
                json!({"op": kind, "profile": prof(json!({"attributes": nested(MAX_NESTING)}))}),
            );
            let Ok(Normalized::Profile { op, .. }) = deepest else {
                panic!("{kind}: {deepest:?}")
            };
            let record = crate::model::Record {
                body: Some(crate::model::record::Body::ProfileOp(op)),
                ..Default::default()
            };
            crate::model::Record::decode(&record.encode_to_vec()[..]).expect(kind);
            let too_deep = op_result(kind, nested(MAX_NESTING + 1));
            assert_eq!(too_deep.code.as_str(), "invalid_field", "{kind}");
            assert!(too_deep.message.contains("nested"), "{}", too_deep.message);
        }
    }

    fn op_result(kind: &str, attributes: Value) -> Rejection {
        op(json!({"op": kind, "profile": prof(json!({"attributes": attributes}))})).unwrap_err()
    }

    #[test]
    fn ops_parse() {
        assert!(
            op(json!({"op": "put", "profile": prof(json!({"attributes": {"a": "1"}}))})).is_ok()
        );
        assert!(op(json!({"op": "patch", "profile": prof(json!({"name": null}))})).is_ok());
        assert!(op(json!({"op": "delete", "profile": prof(json!({}))})).is_ok());
    }

    #[test]
    fn op_rules() {
        assert_eq!(code(json!({"profile": prof(json!({}))})), "missing_field");
        assert_eq!(
            code(json!({"op": "upsert", "profile": prof(json!({}))})),
            "invalid_field"
        );
        assert_eq!(
            code(json!({"op": 1, "profile": prof(json!({}))})),
            "invalid_field"
        );
        assert_eq!(code(json!({"op": "put"})), "missing_field");
        assert_eq!(
            code(json!({"op": "put", "profile": prof(json!({"source": "zendesk"}))})),
            "reserved_source"
        );
        assert_eq!(
            code(json!({"op": "put", "profile": prof(json!({"attributes": [1]}))})),
            "invalid_field"
        );
        assert_eq!(
            code(json!({"op": "patch", "profile": prof(json!({"attributes": "x"}))})),
            "invalid_field"
        );
        assert_eq!(
            code(json!({"op": "patch", "profile": prof(json!({"name": 5}))})),
            "invalid_field"
        );
        assert_eq!(
            code(json!({"op": "put", "profile": prof(json!({"type": "t".repeat(41)}))})),
            "invalid_field"
        );
        assert_eq!(
            code(json!({"op": "put", "profile": prof(json!({"identifiers": []}))})),
            "unresolvable_user"
        );
        assert!(op(
            json!({"op": "put", "user_id": 5, "profile": prof(json!({"identifiers": []}))})
        )
        .is_ok());
    }
}
