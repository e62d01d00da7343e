//! A deterministic, realistic workload (demo and benchmarks): ~70% Zendesk
//! Guide events, ~25% custom shop events, ~5% CRM profile operations, users
//! drawn from a Zipf distribution, values of 200-800 bytes.

use crate::model::time;
use crate::pipeline::Topics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

pub struct Workload {
    rng: StdRng,
    cdf: Vec<f64>,
    seq: u64,
    start_ns: i64,
}

/// One generated input record.
pub struct Generated {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

const GUIDE: [(&str, u32); 6] = [
    ("article_viewed", 45),
    ("help_center_searched", 20),
    ("article_search_result_clicked", 10),
    ("answers_suggested", 8),
    ("suggested_article_clicked", 7),
    ("page_view", 10),
];
const SHOP: [&str; 3] = ["order_completed", "checkout_started", "cart_updated"];
const TITLES: [&str; 8] = [
    "Reset your password",
    "Track your order",
    "Refund policy",
    "Change shipping address",
    "Two-factor authentication",
    "Cancel a subscription",
    "Update billing details",
    "Gift cards",
];
const QUERIES: [&str; 6] = [
    "refund",
    "password",
    "shipping time",
    "cancel order",
    "invoice",
    "gift card",
];

impl Workload {
    /// `users` users, Zipf exponent `s` (1.0 is typical), fixed `seed`.
    pub fn new(seed: u64, users: usize, s: f64) -> Workload {
        let users = users.max(1);
        let mut cdf = Vec::with_capacity(users);
        let mut acc = 0.0;
        for k in 1..=users {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Workload {
            rng: StdRng::seed_from_u64(seed),
            cdf,
            seq: 0,
            start_ns: time::parse_rfc3339("2026-11-20T08:00:00Z").unwrap_or(0),
        }
    }

    fn user(&mut self) -> usize {
        let x: f64 = self.rng.gen();
        self.cdf.partition_point(|c| *c < x).min(self.cdf.len() - 1)
    }

    pub fn zendesk_id(user: usize) -> String {
        (10_000_000 + user).to_string()
    }

    pub fn email(user: usize) -> String {
        format!("customer{user}@example.com")
    }

    fn padding(&mut self, base: usize) -> String {
        let target = self.rng.gen_range(200..=800usize);
        let n = target.saturating_sub(base + 20).max(1);
        "x".repeat(n)
    }

    /// The settings that show every type this workload produces.
    pub fn visibility() -> Value {
        let mut events: Vec<Value> = GUIDE
            .iter()
            .map(|(t, _)| json!({"source": "zendesk", "type": t}))
            .collect();
        events.extend(SHOP.iter().map(|t| json!({"source": "shopify", "type": t})));
        json!({"zendesk_events": true, "events_api": true, "profiles_api": true,
               "shown_event_types": events,
               "shown_profile_types": [{"source": "shopify", "type": "customer"}, {"source": "crm", "type": "contact"}]})
    }

    pub fn next(&mut self, topics: &Topics) -> Generated {
        self.seq += 1;
        let created = time::format_rfc3339(self.start_ns + self.seq as i64 * 10_000_000);
        let u = self.user();
        let roll = self.rng.gen_range(0..100);
        if roll < 70 {
            let total: u32 = GUIDE.iter().map(|(_, w)| w).sum();
            let mut pick = self.rng.gen_range(0..total);
            let mut ty = GUIDE[0].0;
            for (t, w) in GUIDE {
                if pick < w {
                    ty = t;
                    break;
                }
                pick -= w;
            }
            let a = self.rng.gen_range(0..TITLES.len());
            let props = match ty {
                "help_center_searched" => {
                    json!({"search_query": QUERIES[a % QUERIES.len()], "locale": "en-us", "channel": "help_center", "results_count": a})
                }
                "page_view" => {
                    json!({"url": format!("https://shop.example/page/{a}"), "title": TITLES[a]})
                }
                _ => {
                    json!({"article_id": 360000 + a, "article": {"display_name": TITLES[a], "url": format!("https://help.example/hc/articles/{}", 360000 + a)}, "locale": "en-us", "channel": "help_center"})
                }
            };
            let mut v = json!({"id": format!("z-{}", self.seq), "user_id": Self::zendesk_id(u), "type": ty, "description": "", "created_at": created, "properties": props});
            let base = v.to_string().len();
            v["properties"]["user_agent"] = json!(self.padding(base));
            Generated {
                topic: topics.zendesk_events.clone(),
                key: Some(Self::zendesk_id(u).into_bytes()),
                value: v.to_string().into_bytes(),
            }
        } else if roll < 95 {
            let ty = SHOP[self.rng.gen_range(0..SHOP.len())];
            let total = format!(
                "{}.{:02}",
                self.rng.gen_range(5..500),
                self.rng.gen_range(0..100)
            );
            let mut v = json!({
                "profile": {"source": "shopify", "type": "customer", "name": format!("Customer {u}"),
                            "identifiers": [{"type": "email", "value": Self::email(u)}]},
                "event": {"id": format!("s-{}", self.seq), "source": "shopify", "type": ty,
                          "description": format!("Order #{}", 1000 + self.seq), "created_at": created,
                          "properties": {"order": {"id": (1000 + self.seq).to_string(), "total": total, "currency": "EUR"}}}});
            // Half the shop events know the Zendesk user (linking the email), half only the email.
            if self.rng.gen_bool(0.5) {
                v["user_id"] = json!(Self::zendesk_id(u));
            }
            let base = v.to_string().len();
            v["event"]["properties"]["note"] = json!(self.padding(base));
            Generated {
                topic: topics.sunshine_events.clone(),
                key: Some(Self::email(u).into_bytes()),
                value: v.to_string().into_bytes(),
            }
        } else {
            let op = if self.rng.gen_range(0..10) < 8 {
                "put"
            } else {
                "patch"
            };
            let tier = ["bronze", "silver", "gold"][self.rng.gen_range(0..3)];
            let mut v = json!({"op": op, "user_id": Self::zendesk_id(u),
                "profile": {"source": "crm", "type": "contact", "name": format!("Customer {u}"),
                            "identifiers": [{"type": "external_id", "value": format!("C-{u}")}, {"type": "email", "value": Self::email(u)}],
                            "attributes": {"tier": tier, "orders": self.rng.gen_range(0..40).to_string(), "city": "Oslo"}}});
            let base = v.to_string().len();
            v["profile"]["attributes"]["notes"] = json!(self.padding(base));
            Generated {
                topic: topics.sunshine_profiles.clone(),
                key: Some(Self::zendesk_id(u).into_bytes()),
                value: v.to_string().into_bytes(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{normalize, Limits};

    #[test]
    fn deterministic_valid_and_mixed() {
        let t = Topics::default();
        let mut a = Workload::new(7, 1000, 1.0);
        let mut b = Workload::new(7, 1000, 1.0);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..2000 {
            let (x, y) = (a.next(&t), b.next(&t));
            assert_eq!(x.value, y.value);
            assert!(
                (200..=900).contains(&x.value.len()),
                "size {}",
                x.value.len()
            );
            let kind = t.kind(&x.topic).unwrap();
            assert!(normalize(kind, &x.value, 0, Limits::default()).is_ok());
            *counts.entry(x.topic).or_insert(0) += 1;
        }
        assert!(counts[&t.zendesk_events] > 1200 && counts[&t.sunshine_profiles] > 40);
    }
}
