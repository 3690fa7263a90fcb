//! Splitting a request body into candidate events, before any validation.
//!
//! Whole-body problems (malformed JSON, wrong shape, too many events) refuse the request;
//! a malformed NDJSON line or a non-object array element is one rejected event.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The body encodings the collector understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one event object or an array of them.
    Json,
    /// `application/x-ndjson`: one event object per line.
    Ndjson,
    /// `application/cloudevents+json`: exactly one event object.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of event objects.
    CloudEventsBatch,
}

/// A body the collector refuses as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error("malformed JSON at line {line}, column {column}: {reason}")]
    Malformed {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("body: {0}")]
    Shape(&'static str),
    #[error("body: {count} events in one request, at most {max} allowed")]
    TooManyEvents { count: usize, max: usize },
}

/// One candidate event: its JSON object, or why it is not one.
pub type Candidate = Result<Map<String, Value>, String>;

/// Splits `body` into candidate events in request order.
pub fn split(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<Candidate>, BodyError> {
    let items = match format {
        BodyFormat::Ndjson => split_ndjson(body, max_events)?,
        _ => {
            let value: Value = serde_json::from_slice(body).map_err(malformed)?;
            match (value, format) {
                (Value::Object(o), BodyFormat::Json | BodyFormat::CloudEvent) => vec![Ok(o)],
                (Value::Array(a), BodyFormat::Json | BodyFormat::CloudEventsBatch) => {
                    if a.len() > max_events {
                        return Err(BodyError::TooManyEvents {
                            count: a.len(),
                            max: max_events,
                        });
                    }
                    a.into_iter().map(into_object).collect()
                }
                (_, BodyFormat::CloudEvent) => {
                    return Err(BodyError::Shape("must be one CloudEvents JSON object"))
                }
                (_, BodyFormat::CloudEventsBatch) => {
                    return Err(BodyError::Shape("must be a JSON array of CloudEvents"))
                }
                _ => {
                    return Err(BodyError::Shape(
                        "must be a JSON object or an array of objects",
                    ))
                }
            }
        }
    };
    if items.is_empty() {
        return Err(BodyError::Shape("holds no events"));
    }
    Ok(items)
}

/// One candidate event as a slice of the body, not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawCandidate<'a> {
    /// The event's JSON text; `line` is its NDJSON line (1-based), for error messages.
    Text { raw: &'a str, line: Option<usize> },
    /// A candidate the split had to parse (or refuse) already.
    Parsed(Candidate),
}

/// Splits `body` like [`split`], without parsing the events: each is a slice of the body.
/// Bodies it cannot slice cheaply go through [`split`], so the results and errors are the
/// same.
pub fn split_raw(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<RawCandidate<'_>>, BodyError> {
    let parsed = |body| {
        split(body, format, max_events).map(|v| v.into_iter().map(RawCandidate::Parsed).collect())
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match (format, first) {
        (BodyFormat::Ndjson, _) => split_ndjson_raw(body, max_events),
        (BodyFormat::Json | BodyFormat::CloudEventsBatch, Some(b'[')) => {
            match serde_json::from_slice::<Vec<&RawValue>>(body) {
                Ok(items) if !items.is_empty() && items.len() <= max_events => Ok(items
                    .into_iter()
                    .map(|r| RawCandidate::Text {
                        raw: r.get(),
                        line: None,
                    })
                    .collect()),
                _ => parsed(body),
            }
        }
        (BodyFormat::Json | BodyFormat::CloudEvent, Some(b'{')) => {
            match serde_json::from_slice::<&RawValue>(body) {
                Ok(r) => Ok(vec![RawCandidate::Text {
                    raw: r.get(),
                    line: None,
                }]),
                Err(_) => parsed(body),
            }
        }
        _ => parsed(body),
    }
}

fn split_ndjson_raw(body: &[u8], max_events: usize) -> Result<Vec<RawCandidate<'_>>, BodyError> {
    let mut items = Vec::new();
    for (n, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == max_events {
            return Err(BodyError::TooManyEvents {
                count: max_events + 1,
                max: max_events,
            });
        }
        items.push(match std::str::from_utf8(line) {
            Ok(raw) => RawCandidate::Text {
                raw,
                line: Some(n + 1),
            },
            Err(_) => RawCandidate::Parsed(parse_line(line, n + 1)),
        });
    }
    if items.is_empty() {
        return Err(BodyError::Shape("holds no events"));
    }
    Ok(items)
}

/// Parses one NDJSON line (1-based `line`) into a candidate.
pub fn parse_line(text: &[u8], line: usize) -> Candidate {
    match serde_json::from_slice::<Value>(text) {
        Ok(v) => into_object(v),
        Err(e) => Err(format!(
            "malformed JSON at line {line}, column {}: {}",
            e.column(),
            reason(&e)
        )),
    }
}

fn split_ndjson(body: &[u8], max_events: usize) -> Result<Vec<Candidate>, BodyError> {
    let raw = split_ndjson_raw(body, max_events)?;
    Ok(raw
        .into_iter()
        .map(|c| match c {
            RawCandidate::Text { raw, line } => parse_line(raw.as_bytes(), line.unwrap_or(0)),
            RawCandidate::Parsed(c) => c,
        })
        .collect())
}

fn into_object(v: Value) -> Candidate {
    match v {
        Value::Object(o) => Ok(o),
        _ => Err("event: must be a JSON object".to_owned()),
    }
}

fn malformed(e: serde_json::Error) -> BodyError {
    BodyError::Malformed {
        line: e.line(),
        column: e.column(),
        reason: reason(&e),
    }
}

/// serde_json's message without its own " at line L column C" suffix.
fn reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_count(r: &[Candidate]) -> usize {
        r.iter().filter(|c| c.is_ok()).count()
    }

    #[test]
    fn json_object_and_array() {
        assert_eq!(
            split(br#"{"id":"a"}"#, BodyFormat::Json, 10).map(|v| v.len()),
            Ok(1)
        );
        let r = split(br#"[{"id":"a"},{"id":"b"},3]"#, BodyFormat::Json, 10).expect("array");
        assert_eq!((r.len(), ok_count(&r)), (3, 2));
        assert_eq!(r[2], Err("event: must be a JSON object".into()));
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let e = split(b"[\n{\"id\": }\n]", BodyFormat::Json, 10).expect_err("bad");
        match e {
            BodyError::Malformed { line, column, .. } => assert_eq!((line, column), (2, 8)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            split(b"[{\"a\":1}", BodyFormat::Json, 10)
                .expect_err("eof")
                .to_string(),
            "malformed JSON at line 1, column 8: EOF while parsing a list"
        );
    }

    #[test]
    fn shapes_are_enforced_per_format() {
        assert!(matches!(
            split(b"3", BodyFormat::Json, 10),
            Err(BodyError::Shape(_))
        ));
        assert!(matches!(
            split(b"[]", BodyFormat::Json, 10),
            Err(BodyError::Shape(_))
        ));
        assert!(matches!(
            split(b"[{}]", BodyFormat::CloudEvent, 10),
            Err(BodyError::Shape(_))
        ));
        assert!(matches!(
            split(b"{}", BodyFormat::CloudEventsBatch, 10),
            Err(BodyError::Shape(_))
        ));
        assert_eq!(
            split(b"[{},{}]", BodyFormat::CloudEventsBatch, 10).map(|v| v.len()),
            Ok(2)
        );
    }

    #[test]
    fn ndjson_lines_fail_alone() {
        let body = b"{\"id\":\"a\"}\r\n\n{\"id\": oops}\n[1]\n{\"id\":\"b\"}";
        let r = split(body, BodyFormat::Ndjson, 10).expect("ndjson");
        assert_eq!(r.len(), 4);
        assert!(r[0].is_ok() && r[3].is_ok());
        let e = r[1].clone().expect_err("bad line");
        assert!(e.starts_with("malformed JSON at line 3, column 8"), "{e}");
        assert_eq!(r[2], Err("event: must be a JSON object".into()));
        assert!(matches!(
            split(b"\n\n", BodyFormat::Ndjson, 10),
            Err(BodyError::Shape(_))
        ));
    }

    #[test]
    fn batch_size_is_bounded() {
        let e = split(b"[{},{},{}]", BodyFormat::Json, 2).expect_err("too many");
        assert_eq!(e, BodyError::TooManyEvents { count: 3, max: 2 });
        let e = split(b"{}\n{}\n{}\n", BodyFormat::Ndjson, 2).expect_err("too many");
        assert!(matches!(e, BodyError::TooManyEvents { max: 2, .. }));
    }

    #[test]
    fn hostile_input_is_refused_not_crashed() {
        let deep = "[".repeat(100_000);
        assert!(matches!(
            split(deep.as_bytes(), BodyFormat::Json, 10),
            Err(BodyError::Malformed { .. })
        ));
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200));
        let e = split(deep_obj.as_bytes(), BodyFormat::Json, 10).expect_err("deep");
        assert!(e.to_string().contains("recursion limit"), "{e}");
        let bad_utf8 = b"{\"id\":\"\xff\xfe\"}";
        assert!(matches!(
            split(bad_utf8, BodyFormat::Json, 10),
            Err(BodyError::Malformed { .. })
        ));
        let r = split(b"{\"id\":\"\xff\"}\n{}", BodyFormat::Ndjson, 10).expect("ndjson");
        assert!(r[0].is_err() && r[1].is_ok());
    }
}
