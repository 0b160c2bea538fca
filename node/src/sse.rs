//! A reader of Server-Sent Events (the WHATWG `text/event-stream` format), for the CLI reading
//! the control API and for HTTP-backed skills that stream: records end at a blank line; the
//! `event:` and `data:` fields are kept (several `data:` lines join with a newline).

/// One event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseRecord {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined.
    pub data: String,
}

/// Splits a byte stream into events, holding at most `max` bytes of an unfinished one.
#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    max: usize,
}

impl SseParser {
    /// A parser that refuses an event longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        SseParser {
            buf: Vec::new(),
            max,
        }
    }

    /// Takes the next bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseRecord>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let text = &self.buf;
            let end = find_blank_line(text);
            let Some((end, skip)) = end else { break };
            let record = String::from_utf8_lossy(&text[..end]).into_owned();
            self.buf.drain(..end + skip);
            let mut r = SseRecord::default();
            let mut has_data = false;
            for line in record.lines() {
                if let Some(v) = field(line, "event") {
                    r.event = Some(v.to_owned());
                } else if let Some(v) = field(line, "data") {
                    if has_data {
                        r.data.push('\n');
                    }
                    r.data.push_str(v);
                    has_data = true;
                }
            }
            if has_data || r.event.is_some() {
                out.push(r);
            }
        }
        if self.buf.len() > self.max {
            return Err(format!("an event over {} bytes", self.max));
        }
        Ok(out)
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

/// The end of the first record and the length of the blank line after it.
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(if a.0 <= c.0 { a } else { c }),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_and_multi_line_data() {
        let mut p = SseParser::new(1024);
        assert!(
            p.push(b"event: chunk\ndata: {\"a\"")
                .expect("ok")
                .is_empty()
        );
        let got = p
            .push(b": 1}\n\n: comment\n\ndata: x\ndata: y\r\n\r\n")
            .expect("ok");
        assert_eq!(
            got,
            vec![
                SseRecord {
                    event: Some("chunk".into()),
                    data: "{\"a\": 1}".into()
                },
                SseRecord {
                    event: None,
                    data: "x\ny".into()
                }
            ]
        );
        let mut small = SseParser::new(8);
        assert!(small.push(b"data: far too long for this").is_err());
    }
}
