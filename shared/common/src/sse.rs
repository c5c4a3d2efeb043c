//! Server-sent events: one incremental, bounded splitter for both sides of a stream (the
//! gateway reading a cloud upstream, the backend manager reading llama-server / vLLM / TGI).

use bytes::Bytes;

/// Largest SSE event accepted from an upstream (a stream whose event grows past it fails).
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// Splits an SSE byte stream into its `data:` payloads. Line ends `\n`, `\r\n` and `\r` are
/// all accepted (normalised to `\n` as bytes arrive, also across chunk boundaries); events end at
/// a blank line; multi-line data is joined with `\n`; comments and other fields are dropped;
/// `[DONE]` ends the stream. Each byte is scanned once; an event longer than
/// [`MAX_EVENT_BYTES`] is an error.
#[derive(Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a blank line.
    scanned: usize,
    /// The last byte seen was `\r` (a following `\n` belongs to it).
    after_cr: bool,
    done: bool,
}

/// An upstream event over [`MAX_EVENT_BYTES`].
#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLarge;

impl SseSplitter {
    /// Feed bytes; returns the complete payloads found so far.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Bytes>, EventTooLarge> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        for &b in bytes {
            match b {
                b'\r' => {
                    self.buf.push(b'\n');
                    self.after_cr = true;
                }
                b'\n' if self.after_cr => self.after_cr = false,
                _ => {
                    self.buf.push(b);
                    self.after_cr = false;
                }
            }
        }
        let mut start = 0;
        // Resume one byte back: a blank line may straddle the previous push.
        let mut from = self.scanned.saturating_sub(1).max(start);
        while let Some(pos) = self.buf[from..].windows(2).position(|w| w == b"\n\n") {
            let end = from + pos;
            let event = &self.buf[start..end];
            let mut data: Vec<u8> = Vec::new();
            for line in event.split(|&b| b == b'\n') {
                if let Some(d) = line.strip_prefix(b"data:") {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
                }
            }
            start = end + 2;
            from = start;
            if data.is_empty() {
                continue;
            }
            if data == b"[DONE]" {
                self.done = true;
                break;
            }
            out.push(Bytes::from(data));
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(EventTooLarge);
        }
        Ok(out)
    }

    /// Did the stream say `[DONE]`?
    pub fn done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_split_at_blank_lines_whatever_the_chunking() {
        let text = b"data: {\"a\":1}\n\n: comment\n\ndata: {\"b\":\r\ndata: 2}\r\n\r\nevent: x\ndata:{\"c\":3}\n\ndata: [DONE]\n\ndata: {\"late\":1}\n\n";
        let want: Vec<&[u8]> = vec![b"{\"a\":1}", b"{\"b\":\n2}", b"{\"c\":3}"];
        for step in [1, 2, 3, 7, text.len()] {
            let mut s = SseSplitter::default();
            let mut got = Vec::new();
            for c in text.chunks(step) {
                got.extend(s.push(c).unwrap());
            }
            assert!(s.done(), "step {step}");
            assert_eq!(
                got.iter().map(|b| &b[..]).collect::<Vec<_>>(),
                want,
                "step {step}"
            );
        }
    }

    #[test]
    fn cr_only_line_ends_and_oversized_events() {
        let mut s = SseSplitter::default();
        let got = s.push(b"data: a\r\rdata: b\n\r\n").unwrap();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        let mut s = SseSplitter::default();
        let big = vec![b'x'; MAX_EVENT_BYTES / 4 + 1];
        let mut r = Ok(vec![]);
        for _ in 0..4 {
            r = s.push(&big);
        }
        assert_eq!(r, Err(EventTooLarge));
    }
}
