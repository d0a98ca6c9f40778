//! Repeated members: finding one anywhere in a payload, and refusing one
//! while a value is typed.
//!
//! serde's derived structs refuse a repeated field, but maps (`kv`,
//! heartbeat `metadata`, anything parsed into a `Map`) keep the last
//! value silently, and JSON Schema only ever sees that parsed value.
//! spec/README.md says duplicates in a payload are `INVALID_PAYLOAD`.
//!
//! Two halves, one rule:
//! - every map a command payload holds is typed through `strict_map` or
//!   `strict_object`, and `any_json` checks the objects inside a raw
//!   value with `Seen`, so a payload that types without error holds no
//!   repeat and is read once (issue #18: the walk before every typed parse
//!   was a whole extra read of every publish);
//! - [`first_duplicate`] walks a payload that failed to type, to answer
//!   with the JSON pointer of its first repeat in document order, ahead of
//!   any other problem (as when it ran first on every payload).
//!
//! Must not judge anything else: any other problem (bad JSON, nesting past
//! serde_json's limit) is left to the typed parse, which reports it with
//! its own precise path.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The JSON pointer (under `/payload`) of the first repeated member in
/// `payload`, if any.
///
/// This runs on every payload that fails to type, and on none that types
/// (see the module doc). It allocates nothing for a payload
/// without a repeat (issue #18's profile of a publish: a path `String` per
/// member and per array element plus a `HashSet` per object made this walk
/// half of the parse). Keys are borrowed from the text where it has no
/// escapes, small objects are checked against the keys on the stack, and
/// the path is only built once a repeat is found, on the way back out.
pub fn first_duplicate(payload: &str) -> Option<String> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_str(payload);
    let _ = Walk { found: &mut found }.deserialize(&mut de);
    found.map(|mut segments| {
        // Innermost first: the repeated key, then each enclosing segment.
        segments.reverse();
        let mut p = String::from("/payload");
        for seg in &segments {
            p.push('/');
            p.push_str(&seg.replace('~', "~0").replace('/', "~1"));
        }
        p
    })
}

/// The path of a repeat found, innermost segment first, filled in as the
/// walk unwinds.
type Found = Option<Vec<String>>;

struct Walk<'f> {
    found: &'f mut Found,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A member name, borrowed from the payload unless it holds escapes.
pub(crate) struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// Members an object may have before its names move from a scan of the
/// stack to a hash set (most payload objects have a handful).
const SCAN: usize = 8;

/// The names seen so far in one object.
// Kept on the stack on purpose: this is the allocation the walk avoids
// (SCAN × 24 bytes per level of nesting, within serde_json's 128 levels).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Seen<'de> {
    Few([Option<Cow<'de, str>>; SCAN], usize),
    Many(HashSet<Cow<'de, str>>),
}

impl<'de> Seen<'de> {
    pub(crate) fn new() -> Seen<'de> {
        Seen::Few(std::array::from_fn(|_| None), 0)
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        match self {
            Seen::Few(keys, n) => keys[..*n].iter().flatten().any(|k| k == key),
            Seen::Many(set) => set.contains(key),
        }
    }

    /// Records `key` (known not to be there yet).
    pub(crate) fn insert(&mut self, key: Cow<'de, str>) {
        match self {
            Seen::Few(keys, n) if *n < SCAN => {
                keys[*n] = Some(key);
                *n += 1;
            }
            Seen::Few(keys, _) => {
                let mut set: HashSet<Cow<'de, str>> =
                    keys.iter_mut().filter_map(Option::take).collect();
                set.insert(key);
                *self = Seen::Many(set);
            }
            Seen::Many(set) => {
                set.insert(key);
            }
        }
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
            let next = seq.next_element_seed(Walk { found: self.found });
            match next {
                Ok(Some(())) => i += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if let Some(path) = self.found.as_mut() {
                        path.push(i.to_string());
                    }
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = Seen::new();
        while let Some(key) = map.next_key_seed(Key)? {
            if seen.contains(&key) {
                *self.found = Some(vec![key.into_owned()]);
                return Err(de::Error::custom(REPEATED));
            }
            if let Err(e) = map.next_value_seed(Walk { found: self.found }) {
                if let Some(path) = self.found.as_mut() {
                    path.push(key.into_owned());
                }
                return Err(e);
            }
            seen.insert(key);
        }
        Ok(())
    }
}

/// What a typed map says when a member repeats; the path comes from
/// [`first_duplicate`] once the payload has failed.
pub(crate) const REPEATED: &str = "a member appears twice in one object";

/// For `#[serde(deserialize_with)]`: a map that refuses a repeated key
/// (serde's own map impls keep the last value).
pub(crate) fn strict_map<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: de::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Strict<K, V>(PhantomData<(K, V)>);
    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for Strict<K, V> {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry()? {
                if out.insert(k, v).is_some() {
                    return Err(de::Error::custom(REPEATED));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Strict(PhantomData))
}

/// For `#[serde(deserialize_with)]`: a JSON object of any values
/// (heartbeat `metadata`) that refuses a repeated member at any depth
/// (serde_json's `Value` keeps the last one).
pub(crate) fn strict_object<'de, D: de::Deserializer<'de>>(
    d: D,
) -> Result<Map<String, Value>, D::Error> {
    struct Object;
    impl<'de> Visitor<'de> for Object {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            strict_members(map)
        }
    }
    d.deserialize_map(Object)
}

/// An object's members as values built by [`StrictValue`], refusing a
/// repeated one.
fn strict_members<'de, A: MapAccess<'de>>(mut map: A) -> Result<Map<String, Value>, A::Error> {
    let mut out = Map::new();
    while let Some(key) = map.next_key::<String>()? {
        if out.contains_key(&key) {
            return Err(de::Error::custom(REPEATED));
        }
        let value = map.next_value_seed(StrictValue)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// Builds a [`Value`] as serde_json does, but refuses a repeated member.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        strict_members(map).map(Value::Object)
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
        // Past the stack scan (8 names): the hash set takes over without losing a name.
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let many = many.join(",");
        assert_eq!(first_duplicate(&format!("{{{many}}}")), None);
        for repeat in ["k0", "k7", "k8", "k39"] {
            assert_eq!(
                first_duplicate(&format!(r#"{{"m":[1,{{{many},"{repeat}":0}}]}}"#)).as_deref(),
                Some(format!("/payload/m/1/{repeat}").as_str())
            );
        }
        // The first occurrence's value is walked before the repeat is met.
        assert_eq!(
            first_duplicate(r#"{"a":{"b":1,"b":2},"a":3}"#).as_deref(),
            Some("/payload/a/b")
        );
        assert_eq!(
            first_duplicate(r#"{"a":1,"a":{"x":1,"x":2}}"#).as_deref(),
            Some("/payload/a")
        );
        // Not JSON, or too deep: left to the typed parse.
        assert_eq!(first_duplicate("{"), None);
        assert_eq!(first_duplicate(&"[".repeat(10_000)), None);
    }
}
