//! Reading a JSON text one value at a time while keeping each value's own
//! text: for a frame whose parts must be forwarded exactly as received (a
//! published event) without skimming them once to cut them out and again
//! to check them.
//!
//! serde_json types each value ([`Cursor::value`]); the cursor only steps
//! over the whitespace and punctuation between them. It is a fast path:
//! it answers `None` for anything it does not expect, and its caller then
//! reads the text the ordinary way, which explains what is wrong. So it
//! must never accept what that ordinary read refuses, and must not build
//! errors of its own.

use serde::Deserialize;

/// A position in a JSON text.
pub(crate) struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    /// At the start of `text`.
    pub(crate) fn new(text: &'a str) -> Cursor<'a> {
        Cursor { text, at: 0 }
    }

    fn skip_whitespace(&mut self) {
        let rest = &self.text.as_bytes()[self.at..];
        // JSON's four whitespace bytes (RFC 8259 §2), no others.
        let n = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
        self.at += n;
    }

    /// The next byte after any whitespace, not consumed.
    pub(crate) fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.text.as_bytes().get(self.at).copied()
    }

    /// Consumes `byte` if it comes next (after any whitespace).
    pub(crate) fn eat(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        if next {
            self.at += 1;
        }
        next
    }

    /// Consumes `byte`, or `None` if something else comes next.
    pub(crate) fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// The next value typed as `T`, with its text (no surrounding
    /// whitespace); `None` if it does not type.
    pub(crate) fn value<T: Deserialize<'a>>(&mut self) -> Option<(T, &'a str)> {
        self.skip_whitespace();
        let rest = &self.text[self.at..];
        // A stream deserializer stops at the end of one value and says
        // where that is; a number must be followed by whitespace or a
        // delimiter there, as it must be inside a larger value.
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        let value = values.next()?.ok()?;
        let len = values.byte_offset();
        let text = &rest[..len];
        self.at += len;
        Some((value, text))
    }

    /// True if nothing but whitespace is left.
    pub(crate) fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// Reads an object's members, each name handed to `member`, which must
    /// read the member's value from the cursor; `None` if the text is not
    /// an object or `member` answers `None`. Call with the cursor before
    /// the `{`.
    pub(crate) fn object(
        &mut self,
        mut member: impl FnMut(&str, &mut Cursor<'a>) -> Option<()>,
    ) -> Option<()> {
        self.expect(b'{')?;
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return None;
            }
            let (name, _) = self.value::<std::borrow::Cow<'a, str>>()?;
            self.expect(b':')?;
            member(&name, self)?;
            if !self.eat(b',') {
                return self.expect(b'}');
            }
        }
    }

    /// Reads an array's elements, each read from the cursor by `element`;
    /// `None` if the text is not an array or `element` answers `None`.
    pub(crate) fn array(
        &mut self,
        mut element: impl FnMut(&mut Cursor<'a>) -> Option<()>,
    ) -> Option<()> {
        self.expect(b'[')?;
        if self.eat(b']') {
            return Some(());
        }
        loop {
            element(self)?;
            if !self.eat(b',') {
                return self.expect(b']');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members of an object and their texts, or `None`.
    fn members(text: &str) -> Option<Vec<(String, String)>> {
        let mut c = Cursor::new(text);
        let mut out = Vec::new();
        c.object(|name, c| {
            let (_, raw) = c.value::<serde::de::IgnoredAny>()?;
            out.push((name.to_owned(), raw.to_owned()));
            Some(())
        })?;
        c.at_end().then_some(out)
    }

    #[test]
    fn keeps_each_value_as_written() {
        let got = members(" {\"a\" : [1, {\"b\":2}] ,\n\"c\":\"x\\\"y\",\"d\":-1.5e3,\"e\":{}} ")
            .unwrap();
        let want = [
            ("a", "[1, {\"b\":2}]"),
            ("c", "\"x\\\"y\""),
            ("d", "-1.5e3"),
            ("e", "{}"),
        ];
        assert_eq!(
            got,
            want.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec()
        );
        assert_eq!(members("{}"), Some(vec![]));
        let escaped = members(r#"{"\u0061":1}"#).unwrap();
        assert_eq!(escaped[0].0, "a");
    }

    #[test]
    fn answers_none_for_what_json_refuses() {
        for text in [
            "",
            "[]",
            "{",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":1}x",
            "{\"a\":1x}",
            "{\"a\":01}",
            "{\"a\":1}\u{a0}",
            "{\"a\":[1,]}",
        ] {
            assert_eq!(members(text), None, "{text:?}");
            if !text.is_empty() && text != "[]" {
                assert!(
                    serde_json::from_str::<serde::de::IgnoredAny>(text).is_err(),
                    "serde_json reads {text:?}"
                );
            }
        }
    }

    #[test]
    fn reads_arrays_element_by_element() {
        let text = "[ 1,2 , 3 ]";
        let mut c = Cursor::new(text);
        let mut got = Vec::new();
        c.array(|c| {
            got.push(c.value::<u64>()?.0);
            Some(())
        })
        .unwrap();
        assert!(c.at_end());
        assert_eq!(got, [1, 2, 3]);
        for bad in ["[1 2]", "[1,]", "[,1]", "[1"] {
            let mut c = Cursor::new(bad);
            assert_eq!(c.array(|c| c.value::<u64>().map(drop)), None, "{bad}");
        }
    }
}
