//! A hand-written reader for the JSON shapes events nearly always have: objects whose
//! strings carry no escapes and whose values are scalars.
//!
//! It is strict JSON for everything it accepts (RFC 8259 whitespace, numbers without
//! leading zeros, strings without raw control characters) and gives up on anything else:
//! escapes, exponents, nesting where a scalar is expected. Giving up is never an error;
//! the callers then parse with serde_json, which owns every error message. `skip` is the
//! one loose part: it only finds where a value ends, and whatever it delimits is parsed
//! again by serde_json before anyone trusts it.

/// A position in a JSON text.
pub(crate) struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(text: &'a str) -> Cursor<'a> {
        Cursor { text, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Moves back to `pos`, a position the cursor has been at.
    pub(crate) fn rewind(&mut self, pos: usize) {
        debug_assert!(pos <= self.pos);
        self.pos = pos;
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.text.len()
    }

    /// Skips JSON whitespace.
    pub(crate) fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Consumes `c` if it is next.
    pub(crate) fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.pos += 1;
        }
        hit
    }

    /// A string literal without escapes or control characters: its content. Such a
    /// string is written back by serde_json byte for byte between its quotes.
    pub(crate) fn plain_string(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.pos;
        let rest = &self.bytes()[start..];
        let len = rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        self.pos = start + len + 1;
        Some(&self.text[start..start + len])
    }

    /// A number without an exponent, in JSON's grammar: its text.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.pos;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.') {
            let before = self.pos;
            self.digits();
            if self.pos == before {
                return None;
            }
        }
        match self.peek() {
            Some(b'0'..=b'9' | b'e' | b'E') => None,
            _ => Some(&self.text[start..self.pos]),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn word(&mut self, word: &str) -> bool {
        let hit = self.text[self.pos..].starts_with(word);
        if hit {
            self.pos += word.len();
        }
        hit
    }

    /// `null`, if it is next.
    pub(crate) fn null(&mut self) -> bool {
        self.word("null")
    }

    /// A scalar (plain string, number without exponent, `true`, `false`, `null`): its text
    /// as written, quotes included.
    pub(crate) fn scalar(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let ok = match self.peek()? {
            b'"' => self.plain_string().is_some(),
            b'-' | b'0'..=b'9' => self.number().is_some(),
            _ => self.word("true") || self.word("false") || self.null(),
        };
        ok.then(|| &self.text[start..self.pos])
    }

    /// Steps over one value of any shape, nested or escaped, without checking it beyond
    /// its brackets and quotes. Loose on purpose: see the module comment.
    pub(crate) fn skip(&mut self) -> Option<()> {
        let b = self.bytes();
        let mut depth = 0usize;
        loop {
            self.ws();
            match *b.get(self.pos)? {
                b'{' | b'[' => {
                    depth += 1;
                    self.pos += 1;
                    continue;
                }
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    self.pos += 1;
                }
                b',' | b':' if depth > 0 => {
                    self.pos += 1;
                    continue;
                }
                b'"' => {
                    self.pos += 1;
                    loop {
                        match *b.get(self.pos)? {
                            b'\\' => self.pos += 2,
                            b'"' => break,
                            _ => self.pos += 1,
                        }
                    }
                    self.pos += 1;
                }
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.') => {
                    while let Some(c) = self.peek() {
                        if !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.')) {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                _ => return None,
            }
            if depth == 0 {
                return Some(());
            }
        }
    }

    /// Reads an object, handing each key (a plain string) to `value`, which must consume
    /// the value after the colon.
    pub(crate) fn object(
        &mut self,
        mut value: impl FnMut(&'a str, &mut Cursor<'a>) -> Option<()>,
    ) -> Option<()> {
        if !self.eat(b'{') {
            return None;
        }
        self.ws();
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.plain_string()?;
            self.ws();
            if !self.eat(b':') {
                return None;
            }
            self.ws();
            value(key, self)?;
            self.ws();
            if self.eat(b',') {
                self.ws();
                continue;
            }
            return self.eat(b'}').then_some(());
        }
    }
}

/// A flat object: its keys in byte order, each once (a repeated key keeps its last
/// value, as serde_json's map does), each with its value's text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Flat<'a> {
    entries: Vec<(&'a str, &'a str)>,
}

impl<'a> Flat<'a> {
    /// Reads an object of scalars at the cursor.
    pub(crate) fn read(cursor: &mut Cursor<'a>) -> Option<Flat<'a>> {
        let mut entries = Vec::with_capacity(4);
        cursor.object(|key, c| {
            entries.push((key, c.scalar()?));
            Some(())
        })?;
        // Stable: among equal keys the last one sent ends up last, and is the one kept.
        entries.sort_by(|a: &(&str, &str), b| a.0.cmp(b.0));
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                *kept = *later;
            }
            same
        });
        Some(Flat { entries })
    }

    /// The value's text (quotes included for a string).
    pub(crate) fn get(&self, key: &str) -> Option<&'a str> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, v)| v)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.entries.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;

    fn flat(text: &str) -> Option<Vec<(String, String)>> {
        let mut c = Cursor::new(text);
        c.ws();
        let f = Flat::read(&mut c)?;
        c.ws();
        c.at_end().then(|| {
            f.iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
    }

    /// What serde_json reads from the same text, when it is a flat object that `Flat`
    /// should take.
    fn reference(text: &str) -> Option<Vec<(String, String)>> {
        if text.contains('\\') {
            return None;
        }
        let map: BTreeMap<&str, &RawValue> = serde_json::from_str(text).ok()?;
        map.iter()
            .map(|(k, v)| {
                let v = v.get();
                let scalar = match v.as_bytes()[0] {
                    b'{' | b'[' => false,
                    b'-' | b'0'..=b'9' => !v.contains(['e', 'E']),
                    _ => true,
                };
                scalar.then(|| (k.to_string(), v.to_owned()))
            })
            .collect()
    }

    #[test]
    fn reads_flat_objects_and_gives_up_on_the_rest() {
        assert_eq!(
            flat(r#" { "b" : 1.50 , "a":"x", "b": -0, "c": null, "d": true } "#),
            Some(vec![
                ("a".into(), "\"x\"".into()),
                ("b".into(), "-0".into()),
                ("c".into(), "null".into()),
                ("d".into(), "true".into()),
            ])
        );
        assert_eq!(flat("{}"), Some(vec![]));
        for text in [
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":-}"#,
            r#"{"a":1e3}"#,
            r#"{"a":+1}"#,
            r#"{"a":"\u0041"}"#,
            "{\"a\":\"x\ty\"}",
            r#"{"a":{"b":1}}"#,
            r#"{"a":[1]}"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":truex}"#,
            r#"{"a":1"#,
            r#"{"a":1} x"#,
            r#"{a:1}"#,
        ] {
            assert_eq!(flat(text), None, "{text}");
        }
    }

    #[test]
    fn skip_finds_the_end_of_any_value() {
        for (text, end) in [
            (r#"{"a":"}\"]","b":[1,{"c":[]}]} , 2"#, 29),
            ("-1.5e+3 ]", 7),
            (r#""x\\" ,"#, 5),
            ("[[], {}]", 8),
            ("true,", 4),
        ] {
            let mut c = Cursor::new(text);
            assert_eq!(c.skip(), Some(()), "{text}");
            assert_eq!(c.pos(), end, "{text}");
        }
        for text in ["]", ",", "{\"a\":1", "\"open"] {
            assert_eq!(Cursor::new(text).skip(), None, "{text}");
        }
    }

    fn repeats_a_key(text: &str) -> bool {
        struct Keys(Vec<String>);
        impl<'de> serde::Deserialize<'de> for Keys {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Keys;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Keys, A::Error> {
                        let mut keys = Vec::new();
                        while let Some((k, _)) =
                            map.next_entry::<String, serde::de::IgnoredAny>()?
                        {
                            keys.push(k);
                        }
                        Ok(Keys(keys))
                    }
                }
                d.deserialize_map(V)
            }
        }
        let Keys(mut keys) = serde_json::from_str(text).expect("the reference read it");
        let n = keys.len();
        keys.sort();
        keys.dedup();
        keys.len() < n
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,4})?",
            "\"[a-z /é]{0,6}\"",
            Just("true".to_owned()),
            Just("null".to_owned()),
            Just("1e5".to_owned()),
            Just("{}".to_owned()),
            Just("\"a\\\"b\"".to_owned()),
        ]
    }

    fn object() -> impl Strategy<Value = String> {
        proptest::collection::vec(("[abc]{1,2}", value()), 0..6).prop_map(|kv| {
            let fields: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", fields.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever `Flat` takes, serde_json reads alike; whatever serde_json reads as a
        /// flat object without escapes, `Flat` takes. Damaged texts included.
        #[test]
        fn flat_reads_exactly_what_serde_json_reads(
            text in object(),
            cut in any::<proptest::sample::Index>(),
            insert in proptest::option::of(prop_oneof![
                Just(","), Just("}"), Just("\""), Just("0"), Just("."), Just(" "), Just("\n"),
                Just("\u{1}"), Just("-"), Just(":"), Just("e"),
            ]),
        ) {
            let text = match insert {
                None => text,
                Some(s) => {
                    let mut at = cut.index(text.len() + 1);
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    format!("{}{s}{}", &text[..at], &text[at..])
                }
            };
            match (flat(&text), reference(&text)) {
                (Some(f), r) => prop_assert_eq!(Some(f), r, "{}", text),
                // Stricter than the map is fine where a repeated key hid a value it would
                // not take: the text then goes to the full parse.
                (None, Some(_)) => prop_assert!(repeats_a_key(&text), "{}", text),
                (None, None) => {}
            }
        }
    }
}
