//! Finds a member that appears twice in one JSON object of a payload.
//!
//! serde's derived structs refuse a repeated field, but maps (`kv`,
//! heartbeat `metadata`, anything parsed into a `Map`) keep the last
//! value silently, and JSON Schema only ever sees that parsed value.
//! spec/README.md says duplicates in a payload are `INVALID_PAYLOAD`, so
//! the whole payload is walked once before it is typed.
//! Must not judge anything else: any other problem (bad JSON, nesting past
//! serde_json's limit) is left to the typed parse, which reports it with
//! its own precise path.

use std::collections::HashSet;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// The JSON pointer (under `/payload`) of the first repeated member in
/// `payload`, if any.
pub fn first_duplicate(payload: &str) -> Option<String> {
    let mut found = None;
    let mut path = Vec::new();
    let mut de = serde_json::Deserializer::from_str(payload);
    let _ = Walk {
        path: &mut path,
        found: &mut found,
    }
    .deserialize(&mut de);
    found
}

struct Walk<'p> {
    path: &'p mut Vec<String>,
    found: &'p mut Option<String>,
}

fn pointer(path: &[String], last: &str) -> String {
    let mut p = String::from("/payload");
    for seg in path.iter().map(String::as_str).chain(std::iter::once(last)) {
        p.push('/');
        p.push_str(&seg.replace('~', "~0").replace('/', "~1"));
    }
    p
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            self.path.push(i.to_string());
            let next = seq.next_element_seed(Walk {
                path: self.path,
                found: self.found,
            });
            self.path.pop();
            match next? {
                Some(()) => i += 1,
                None => return Ok(()),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                *self.found = Some(pointer(self.path, &key));
                return Err(de::Error::custom("duplicate member"));
            }
            self.path.push(key.clone());
            let value = map.next_value_seed(Walk {
                path: self.path,
                found: self.found,
            });
            self.path.pop();
            value?;
            seen.insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::first_duplicate;

    #[test]
    fn finds_the_first_repeated_member_at_any_depth() {
        assert_eq!(first_duplicate(r#"{"a":1,"b":2}"#), None);
        assert_eq!(
            first_duplicate(r#"{"kv":{"a":"1","a":"2"}}"#).as_deref(),
            Some("/payload/kv/a")
        );
        assert_eq!(
            first_duplicate(r#"{"x":[{},{"k/~":1,"k/~":2}]}"#).as_deref(),
            Some("/payload/x/1/k~1~0")
        );
        assert_eq!(
            first_duplicate(r#"{"a":1,"a":1}"#).as_deref(),
            Some("/payload/a")
        );
        // Escapes name the same member.
        assert_eq!(
            first_duplicate(r#"{"a":1,"\u0061":1}"#).as_deref(),
            Some("/payload/a")
        );
        // Not JSON, or too deep: left to the typed parse.
        assert_eq!(first_duplicate("{"), None);
        assert_eq!(first_duplicate(&"[".repeat(10_000)), None);
    }
}
