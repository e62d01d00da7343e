//! User resolution (CONTRACT §3.4), as pure rules over an identity lookup.
//!
//! 1. An explicit `user_id` wins; its identifiers are linked to it.
//! 2. Otherwise the first identifier, in priority order, linked to a user gives the user.
//! 3. Otherwise the user is new, `TYPE:VALUE` of the highest-priority identifier.
//!
//! Links are only ever added, never moved: an identifier already linked to
//! another user is reported as a conflict and left alone.

use crate::model::{Identifier, IdentityLink};
use std::collections::HashMap;

/// Where existing links are looked up.
pub trait IdentityLookup {
    fn linked_user(&self, id: &Identifier) -> Option<String>;
}

/// Links made earlier in the same batch, over a lookup of committed links.
pub struct Overlay<'a, L: IdentityLookup> {
    pub base: &'a L,
    pub pending: &'a HashMap<String, String>,
}

impl<L: IdentityLookup> IdentityLookup for Overlay<'_, L> {
    fn linked_user(&self, id: &Identifier) -> Option<String> {
        self.pending
            .get(&id.key())
            .cloned()
            .or_else(|| self.base.linked_user(id))
    }
}

impl IdentityLookup for HashMap<String, String> {
    fn linked_user(&self, id: &Identifier) -> Option<String> {
        self.get(&id.key()).cloned()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub user_id: String,
    /// Identifiers newly linked to `user_id`.
    pub new_links: Vec<IdentityLink>,
    /// Identifiers that stay linked to another user: (identifier, that user).
    pub conflicts: Vec<(Identifier, String)>,
}

/// The user a record belongs to, or `None` if neither a user id nor an
/// identifier is given. `ids` must be in priority order (ingest sorts them).
/// With `create == false` (profile patch/delete) rule 3 does not apply.
pub fn resolve(
    explicit: Option<&str>,
    ids: &[Identifier],
    lookup: &impl IdentityLookup,
    create: bool,
) -> Option<Resolution> {
    let existing: Vec<Option<String>> = ids.iter().map(|i| lookup.linked_user(i)).collect();
    let user_id = match explicit {
        Some(u) => u.to_string(),
        None => match existing.iter().flatten().next() {
            Some(u) => u.clone(),
            None if create => ids.first()?.key(),
            None => return None,
        },
    };
    let mut new_links = Vec::new();
    let mut conflicts = Vec::new();
    for (id, linked) in ids.iter().zip(existing) {
        match linked {
            None => new_links.push(IdentityLink {
                identifier: Some(id.clone()),
                user_id: user_id.clone(),
            }),
            Some(u) if u == user_id => {}
            Some(other) => conflicts.push((id.clone(), other)),
        }
    }
    Some(Resolution {
        user_id,
        new_links,
        conflicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn id(t: &str, v: &str) -> Identifier {
        Identifier::new(t, v)
    }

    #[test]
    fn explicit_user_id_wins_and_links_its_identifiers() {
        let l = links(&[("email:a@x", "other")]);
        let r = resolve(
            Some("42"),
            &[id("email", "a@x"), id("phone_number", "1")],
            &l,
            true,
        )
        .unwrap();
        assert_eq!(r.user_id, "42");
        assert_eq!(r.new_links.len(), 1);
        assert_eq!(
            r.new_links[0].identifier.as_ref().unwrap().key(),
            "phone_number:1"
        );
        assert_eq!(r.conflicts, vec![(id("email", "a@x"), "other".to_string())]);
    }

    #[test]
    fn first_linked_identifier_in_priority_order_gives_the_user() {
        let l = links(&[("email:a@x", "u-email"), ("phone_number:1", "u-phone")]);
        let r = resolve(
            None,
            &[
                id("external_id", "E"),
                id("email", "a@x"),
                id("phone_number", "1"),
            ],
            &l,
            true,
        )
        .unwrap();
        assert_eq!(r.user_id, "u-email");
        assert_eq!(r.new_links.len(), 1, "external_id gets linked");
        assert_eq!(r.conflicts.len(), 1, "phone stays with u-phone");
    }

    #[test]
    fn new_user_is_named_after_the_highest_priority_identifier() {
        let l = links(&[]);
        let r = resolve(None, &[id("email", "a@x"), id("twitter", "@a")], &l, true).unwrap();
        assert_eq!(r.user_id, "email:a@x");
        assert_eq!(r.new_links.len(), 2);
        // Values other than emails and twitter handles keep their spaces,
        // so `C-77` and `C-77 ` are two customers with two ids.
        let r = resolve(None, &[id("external_id", "C-77 ")], &l, true).unwrap();
        assert_eq!(r.user_id, "external_id:C-77 ");
        assert!(resolve(None, &[], &l, true).is_none());
        assert!(
            resolve(None, &[id("email", "a@x")], &l, false).is_none(),
            "patch/delete never create users"
        );
    }

    #[test]
    fn overlay_sees_links_of_the_same_batch() {
        let base = links(&[]);
        let pending = links(&[("email:a@x", "u1")]);
        let o = Overlay {
            base: &base,
            pending: &pending,
        };
        assert_eq!(
            resolve(None, &[id("email", "a@x")], &o, true)
                .unwrap()
                .user_id,
            "u1"
        );
    }
}
