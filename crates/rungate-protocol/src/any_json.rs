//! Members whose value may be any JSON (`data` of an output event and of a
//! checkpoint), checked so that the frames carrying them back out can be
//! read by the strict parsers clients use.
//!
//! The gateway keeps such values as the raw text it received and splices
//! that text into `stream.events` pushes and `checkpoint.load` replies.
//! The envelope parser only skims a raw value: it accepts text that is
//! JSON by grammar but that serde_json (the Rust client, the tests), Go and
//! others refuse when they parse the frame it ends up in, and a refused
//! `stream.events` frame loses every event it carries, for every viewer,
//! on every resume. So (found with the fuzz target, whose check that every
//! frame parses failed on them; issue #5) these are refused at the door
//! with `INVALID_PAYLOAD`:
//!
//! - a string holding an escaped lone surrogate (`"\ud800"`): RFC 8259
//!   §8.2 leaves its meaning undefined;
//! - a number beyond a double's range (`1e400`);
//! - nesting deeper than [`MAX_DEPTH`] arrays and objects: a published
//!   event reaches viewers one level deeper than it arrived, and serde_json
//!   stops at 128 levels for the whole frame;
//! - a member repeated in one object (see [`crate::duplicates`]: this walk
//!   is what makes a typed payload free of repeats inside its raw values).
//!
//! Must not keep or change the value: callers keep the raw text.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::duplicates::{Key, REPEATED, Seen};

/// Most levels of arrays and objects in one `data` value.
pub const MAX_DEPTH: usize = 64;

/// A value that passed the checks; holds nothing (the caller keeps the
/// raw text).
pub struct AnyJson;

impl<'de> Deserialize<'de> for AnyJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Level(0).deserialize(d).map(|()| AnyJson)
    }
}

/// For `#[serde(deserialize_with)]`: the raw text of a value that passes
/// the checks.
pub fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Box<RawValue>, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    serde_json::from_str::<AnyJson>(raw.get()).map_err(de::Error::custom)?;
    Ok(raw)
}

/// Walks a value with `deserialize_any`, which makes serde_json decode
/// (and so check) every string and number; `self.0` containers enclose it.
#[derive(Clone, Copy)]
struct Level(usize);

impl Level {
    fn inner<E: de::Error>(self) -> Result<Level, E> {
        if self.0 >= MAX_DEPTH {
            return Err(E::custom(format!(
                "nested deeper than {MAX_DEPTH} levels of arrays and objects"
            )));
        }
        Ok(Level(self.0 + 1))
    }
}

impl<'de> DeserializeSeed<'de> for Level {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level {
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
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        let mut seen = Seen::new();
        // A member name is a string, so reading it as one checks it as
        // `deserialize_any` would (a lone surrogate is refused either way).
        while let Some(key) = map.next_key_seed(Key)? {
            if seen.contains(&key) {
                return Err(de::Error::custom(REPEATED));
            }
            map.next_value_seed(inner)?;
            seen.insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> bool {
        serde_json::from_str::<AnyJson>(text).is_ok()
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn accepts_what_strict_parsers_read() {
        for text in [
            "null",
            "true",
            "-0",
            "1e308",
            "1180591620717411303424",
            r#""\ud83d\ude00 \u00e9 \u0000""#,
            r#"{"a":[1,{"b":null}],"":{}}"#,
        ] {
            assert!(ok(text), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
        }
        assert!(ok(&nested(MAX_DEPTH)));
    }

    #[test]
    fn refuses_what_they_do_not() {
        for text in [
            r#""\ud800""#,
            r#""\udc00x""#,
            r#"{"\ud800":1}"#,
            r#"[1,"\ud83d"]"#,
            "1e400",
            "-1e400",
        ] {
            assert!(!ok(text), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err());
        }
        assert!(!ok(&nested(MAX_DEPTH + 1)));
        let deep_object = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(!ok(&deep_object));
    }
}
