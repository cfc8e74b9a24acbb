//! Just enough HTTP/1.1 to read `kubectl proxy`'s answers in [`crate::kubelab`], without
//! I/O: a response-head parser and a body decoder (fixed length, chunked or until close)
//! fed with whatever bytes the connection produced. (The agent itself talks to the API
//! server through kube-rs.)

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed response head: {0}")]
    MalformedHead(String),
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("malformed chunked body: {0}")]
    MalformedChunk(String),
}

/// Heads past this are refused: the API server's are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

/// The parts of a response head the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyDecoder,
}

/// Parses a response head from the start of `input`. `Ok(None)` until the blank line has
/// arrived; then the head and how many bytes of `input` it took.
pub fn parse_head(input: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
        if input.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge(MAX_HEAD));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&input[..end])
        .map_err(|_| HttpError::MalformedHead("not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::MalformedHead(format!(
            "status line {status_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::MalformedHead(format!("version {version:?}")));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| HttpError::MalformedHead(format!("status code {code:?}")))?;
    let (mut chunked, mut length) = (false, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::MalformedHead(format!("header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| HttpError::MalformedHead(format!("content-length {value:?}")))?,
            );
        }
    }
    let body = match (chunked, length) {
        (true, _) => BodyDecoder::Chunked(ChunkState::Size(Vec::new())),
        (false, Some(n)) => BodyDecoder::Length(n),
        (false, None) => BodyDecoder::UntilClose,
    };
    Ok(Some((ResponseHead { status, body }, end + 4)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkState {
    /// Reading the size line; holds its bytes so far.
    Size(Vec<u8>),
    /// This many data bytes of the chunk remain.
    Data(u64),
    /// The CRLF after a chunk's data; how many of its two bytes were seen.
    DataEnd(u8),
    /// After the last (zero) chunk: trailers up to a blank line; holds the current line.
    Trailer(Vec<u8>),
    Done,
}

/// Turns the bytes after the head into the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyDecoder {
    /// This many bytes remain.
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

impl BodyDecoder {
    /// Whether the whole body has been decoded (never, for a body that ends at close).
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            BodyDecoder::Length(0) | BodyDecoder::Chunked(ChunkState::Done)
        )
    }

    /// Decodes as much of `input` as it can into `out`; returns the bytes it consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        match self {
            BodyDecoder::UntilClose => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
            BodyDecoder::Length(remaining) => {
                let take = input
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..take]);
                *remaining -= take as u64;
                Ok(take)
            }
            BodyDecoder::Chunked(state) => feed_chunked(state, input, out),
        }
    }
}

fn feed_chunked(
    state: &mut ChunkState,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, HttpError> {
    let mut at = 0;
    while at < input.len() {
        match state {
            ChunkState::Done => break,
            ChunkState::Size(line) => {
                let byte = input[at];
                at += 1;
                if byte != b'\n' {
                    if line.len() > 1024 {
                        return Err(HttpError::MalformedChunk("size line too long".into()));
                    }
                    line.push(byte);
                    continue;
                }
                let text = std::str::from_utf8(line)
                    .map_err(|_| HttpError::MalformedChunk("size not UTF-8".into()))?;
                // Extensions after ';' carry nothing the client needs.
                let digits = text.trim_end_matches('\r').split(';').next().unwrap_or("");
                let size = u64::from_str_radix(digits.trim(), 16)
                    .map_err(|_| HttpError::MalformedChunk(format!("size {digits:?}")))?;
                *state = if size == 0 {
                    ChunkState::Trailer(Vec::new())
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(remaining) => {
                let available = input.len() - at;
                let take = available.min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[at..at + take]);
                at += take;
                *remaining -= take as u64;
                if *remaining == 0 {
                    *state = ChunkState::DataEnd(0);
                }
            }
            ChunkState::DataEnd(seen) => {
                let expected = if *seen == 0 { b'\r' } else { b'\n' };
                if input[at] != expected {
                    return Err(HttpError::MalformedChunk("no CRLF after chunk data".into()));
                }
                at += 1;
                *seen += 1;
                if *seen == 2 {
                    *state = ChunkState::Size(Vec::new());
                }
            }
            ChunkState::Trailer(line) => {
                let byte = input[at];
                at += 1;
                if byte != b'\n' {
                    line.push(byte);
                    continue;
                }
                if line.is_empty() || line.as_slice() == b"\r" {
                    *state = ChunkState::Done;
                } else {
                    line.clear();
                }
            }
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut BodyDecoder, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            let used = decoder.feed(piece, &mut out).expect("valid body");
            assert_eq!(used, piece.len());
        }
        out
    }

    #[test]
    fn head_waits_for_the_blank_line() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"),
            Ok(None)
        );
        let (head, used) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.body, BodyDecoder::Length(2));
        assert_eq!(used, 38);
    }

    #[test]
    fn head_recognises_chunked_and_close_delimited_bodies() {
        let (head, _) = parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(matches!(head.body, BodyDecoder::Chunked(_)));
        let (head, _) = parse_head(b"HTTP/1.0 403 Forbidden\r\nX: y\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((head.status, head.body), (403, BodyDecoder::UntilClose));
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert_eq!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]),
            Err(HttpError::HeadTooLarge(MAX_HEAD))
        );
    }

    #[test]
    fn fixed_length_body_stops_at_its_length() {
        let mut decoder = BodyDecoder::Length(5);
        let mut out = Vec::new();
        assert_eq!(decoder.feed(b"hel", &mut out), Ok(3));
        assert_eq!(decoder.feed(b"lo, extra", &mut out), Ok(2));
        assert_eq!(out, b"hello");
        assert!(decoder.is_done());
    }

    #[test]
    fn chunked_body_decodes_across_any_split() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..wire.len() {
            let mut decoder = BodyDecoder::Chunked(ChunkState::Size(Vec::new()));
            let out = decode_all(&mut decoder, &[&wire[..split], &wire[split..]]);
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(decoder.is_done());
        }
        let mut decoder = BodyDecoder::Chunked(ChunkState::Size(Vec::new()));
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&mut decoder, &bytewise), b"hello, world");
    }

    #[test]
    fn chunked_body_rejects_garbage() {
        let mut out = Vec::new();
        let mut decoder = BodyDecoder::Chunked(ChunkState::Size(Vec::new()));
        assert!(decoder.feed(b"zz\r\n", &mut out).is_err());
        let mut decoder = BodyDecoder::Chunked(ChunkState::Size(Vec::new()));
        assert!(decoder.feed(b"2\r\nabXY", &mut out).is_err());
    }
}
