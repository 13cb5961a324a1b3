//! SPEC 3.1 framing: one frame per request and per response, each an unsigned LEB128 varint byte
//! length followed by that many bytes of UTF-8 JSON.
//!
//! The pure functions [`decode_varint`], [`decode_frame`] and [`encode_frame`] hold every rule
//! (fuzz targets call them directly); [`read_frame`], [`write_frame`] and the libp2p
//! [`FrameCodec`] drive them over async streams. A declared length above the limit is refused
//! before anything is allocated for the body, and a body within the limit is read incrementally, so
//! a peer that declares a large frame and then stalls costs no more memory than it sent.

use std::io;
use std::sync::Arc;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use optimystic_core::ErrorCode;
use serde_json::Value;

/// The longest valid length prefix: a `u64` needs at most 10 LEB128 bytes.
pub const MAX_VARINT_BYTES: usize = 10;
/// Default frame limit of the repo protocol (SPEC 3.1): 8 MiB.
pub const DEFAULT_REPO_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Default frame limit of the cluster protocol (SPEC 3.1): 1 MiB.
pub const DEFAULT_CLUSTER_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Default frame limit of the sync protocol: 8 MiB, as it carries revisions like the repo protocol.
pub const DEFAULT_SYNC_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Default response frame limit of the repo and sync protocols: 32 MiB, four times the request
/// limit, so that reads return any block that exists (one at `limits.max_block_bytes`, or one over
/// it that an older version wrote) with its envelope. Responses are only ever read by the peer that
/// asked for them.
pub const DEFAULT_MAX_RESPONSE_FRAME_BYTES: usize = 32 * 1024 * 1024;
/// The largest frame limit a node accepts in its configuration: 256 MiB.
pub const HARD_MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// The body buffer grows in steps up to the declared length; this is the first reservation.
const INITIAL_BODY_CAPACITY_BYTES: usize = 64 * 1024;

/// Why a frame is malformed. Every variant is the sender's fault; none is an I/O failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix runs past [`MAX_VARINT_BYTES`] bytes.
    #[error("length prefix is longer than {MAX_VARINT_BYTES} bytes")]
    VarintTooLong,
    /// The length prefix does not fit in 64 bits.
    #[error("length prefix overflows 64 bits")]
    VarintOverflow,
    /// The declared length is above the protocol's limit; nothing of the body was read.
    #[error("frame of {declared_bytes} bytes exceeds the limit of {max_frame_bytes} bytes")]
    Oversize {
        /// The length the sender declared.
        declared_bytes: u64,
        /// The limit.
        max_frame_bytes: usize,
    },
    /// The stream ended inside the length prefix (or before it).
    #[error("stream ended inside the length prefix after {received_bytes} bytes")]
    TruncatedPrefix {
        /// Prefix bytes received.
        received_bytes: usize,
    },
    /// The stream ended before the declared number of body bytes arrived.
    #[error("stream ended after {received_bytes} of {declared_bytes} body bytes")]
    TruncatedBody {
        /// The declared length.
        declared_bytes: u64,
        /// The body bytes received.
        received_bytes: u64,
    },
    /// The body is not UTF-8.
    #[error("frame is not UTF-8: {0}")]
    NotUtf8(String),
    /// The body is UTF-8 but not one JSON value.
    #[error("frame is not JSON: {0}")]
    NotJson(String),
}

/// Decodes an unsigned LEB128 length prefix at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` ends inside a prefix that may still be valid, or
/// `Ok(Some((value, prefix_len)))`. Non-minimal encodings (trailing `0x80` groups) are accepted as
/// long as they fit in [`MAX_VARINT_BYTES`] bytes.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_BYTES).enumerate() {
        if i == MAX_VARINT_BYTES - 1 {
            if byte & 0x80 != 0 {
                return Err(FrameError::VarintTooLong);
            }
            if byte > 1 {
                return Err(FrameError::VarintOverflow);
            }
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_BYTES {
        return Err(FrameError::VarintTooLong);
    }
    Ok(None)
}

/// Appends the unsigned LEB128 encoding of `value` to `out`.
pub fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        // Truncation to the low 7 bits is the encoding.
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Checks a declared length against the limit, before anything is allocated for it.
pub fn check_length(declared_bytes: u64, max_frame_bytes: usize) -> Result<usize, FrameError> {
    match usize::try_from(declared_bytes) {
        Ok(len) if len <= max_frame_bytes => Ok(len),
        _ => Err(FrameError::Oversize { declared_bytes, max_frame_bytes }),
    }
}

/// Decodes a frame body: UTF-8, then exactly one JSON value (serde_json's nesting limit applies).
pub fn decode_body(body: &[u8]) -> Result<Value, FrameError> {
    let text = std::str::from_utf8(body).map_err(|e| FrameError::NotUtf8(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))
}

/// Decodes one frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame that may still be valid, or
/// `Ok(Some((value, consumed_bytes)))`. A declared length above `max_frame_bytes` is an error as
/// soon as the prefix is complete, whatever follows. Pure: never panics, allocates only for the
/// decoded JSON.
pub fn decode_frame(buf: &[u8], max_frame_bytes: usize) -> Result<Option<(Value, usize)>, FrameError> {
    let Some((declared, prefix_len)) = decode_varint(buf)? else {
        return Ok(None);
    };
    let len = check_length(declared, max_frame_bytes)?;
    let Some(end) = prefix_len.checked_add(len) else {
        return Err(FrameError::Oversize { declared_bytes: declared, max_frame_bytes });
    };
    let Some(body) = buf.get(prefix_len..end) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, end)))
}

/// Encodes `value` as one frame. Fails with [`FrameError::Oversize`] when its JSON is longer than
/// `max_frame_bytes`.
pub fn encode_frame(value: &Value, max_frame_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let (mut buf, start) = encode_frame_in_place(value, max_frame_bytes)?;
    buf.drain(..start);
    Ok(buf)
}

/// Encodes `value` as one frame into a buffer whose frame starts at the returned offset: the JSON
/// is written once, after room for the longest length prefix, and the prefix goes right before
/// it (no second copy of the body).
fn encode_frame_in_place(value: &Value, max_frame_bytes: usize) -> Result<(Vec<u8>, usize), FrameError> {
    let mut buf = vec![0u8; MAX_VARINT_BYTES];
    serde_json::to_writer(&mut buf, value).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let body_len = buf.len().saturating_sub(MAX_VARINT_BYTES);
    let declared_bytes = u64::try_from(body_len).unwrap_or(u64::MAX);
    if body_len > max_frame_bytes {
        return Err(FrameError::Oversize { declared_bytes, max_frame_bytes });
    }
    let mut prefix = Vec::with_capacity(MAX_VARINT_BYTES);
    encode_varint(declared_bytes, &mut prefix);
    let start = MAX_VARINT_BYTES.saturating_sub(prefix.len());
    match buf.get_mut(start..MAX_VARINT_BYTES) {
        Some(slot) if slot.len() == prefix.len() => slot.copy_from_slice(&prefix),
        _ => return Err(FrameError::VarintTooLong),
    }
    Ok((buf, start))
}

/// Writes `value` as one frame (see [`encode_frame`]) and flushes.
async fn write_encoded<W>(io: &mut W, value: &Value, max_frame_bytes: usize) -> io::Result<()>
where
    W: AsyncWrite + Unpin + Send,
{
    let (buf, start) =
        encode_frame_in_place(value, max_frame_bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(buf.get(start..).unwrap_or_default()).await?;
    io.flush().await
}

/// Reads one frame from a stream.
///
/// The outer `io::Result` fails only on transport errors; a malformed frame (bad prefix, oversize,
/// truncated, not UTF-8, not JSON) is the inner `Err`, so the caller can still answer it. An
/// oversize frame is refused as soon as its prefix is read: the body is left unread.
pub async fn read_frame<R>(io: &mut R, max_frame_bytes: usize) -> io::Result<Result<Value, FrameError>>
where
    R: AsyncRead + Unpin + Send,
{
    let mut prefix = [0u8; MAX_VARINT_BYTES];
    let mut prefix_len = 0usize;
    let declared = loop {
        let Some(slot) = prefix.get_mut(prefix_len..=prefix_len) else {
            return Ok(Err(FrameError::VarintTooLong));
        };
        match io.read_exact(slot).await {
            Ok(()) => prefix_len += 1,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Err(FrameError::TruncatedPrefix { received_bytes: prefix_len }));
            }
            Err(e) => return Err(e),
        }
        match decode_varint(prefix.get(..prefix_len).unwrap_or_default()) {
            Ok(Some((value, _))) => break value,
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
    };
    let len = match check_length(declared, max_frame_bytes) {
        Ok(len) => len,
        Err(e) => return Ok(Err(e)),
    };
    let mut body = Vec::with_capacity(len.min(INITIAL_BODY_CAPACITY_BYTES));
    (&mut *io).take(declared).read_to_end(&mut body).await?;
    if body.len() < len {
        let received_bytes = u64::try_from(body.len()).unwrap_or(u64::MAX);
        return Ok(Err(FrameError::TruncatedBody { declared_bytes: declared, received_bytes }));
    }
    Ok(decode_body(&body))
}

/// Writes one frame to a stream and flushes it. A value whose JSON exceeds `max_frame_bytes` is
/// refused with [`io::ErrorKind::InvalidInput`] before anything is written.
pub async fn write_frame<W>(io: &mut W, value: &Value, max_frame_bytes: usize) -> io::Result<()>
where
    W: AsyncWrite + Unpin + Send,
{
    write_encoded(io, value, max_frame_bytes).await
}

/// A request as the codec carries it: the parsed JSON, or (inbound only) why the frame was
/// malformed, so the service can answer with an error envelope instead of dropping the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A well-formed frame.
    Json(Value),
    /// An outbound request whose JSON is shared with other sends (one record to each member);
    /// written like [`Frame::Json`], never produced by reading.
    Shared(Arc<Value>),
    /// A malformed inbound frame. Writing it is refused.
    Malformed(FrameError),
}

impl Frame {
    /// The frame's JSON, or why it is malformed.
    pub fn into_json(self) -> Result<Value, FrameError> {
        match self {
            Self::Json(value) => Ok(value),
            Self::Shared(value) => Ok(Arc::unwrap_or_clone(value)),
            Self::Malformed(e) => Err(e),
        }
    }
}

/// The libp2p request-response codec of one protocol, with that protocol's frame limits: one for
/// requests and one for responses.
///
/// Inbound requests never fail on malformed content (they become [`Frame::Malformed`]); inbound
/// responses do, as an [`io::ErrorKind::InvalidData`] error. An outbound response too large for
/// the limit is replaced by an `internal` error envelope, so the requester always gets an answer.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
    max_response_frame_bytes: usize,
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame_bytes` in either direction.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes, max_response_frame_bytes: max_frame_bytes }
    }

    /// The same codec with its own limit for responses (written and read).
    #[must_use]
    pub fn with_max_response_frame_bytes(mut self, max_response_frame_bytes: usize) -> Self {
        self.max_response_frame_bytes = max_response_frame_bytes;
        self
    }

    /// The request frame limit.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// The response frame limit.
    pub fn max_response_frame_bytes(&self) -> usize {
        self.max_response_frame_bytes
    }
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Value;

    async fn read_request<T>(&mut self, _protocol: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(match read_frame(io, self.max_frame_bytes).await? {
            Ok(value) => Frame::Json(value),
            Err(e) => Frame::Malformed(e),
        })
    }

    async fn read_response<T>(&mut self, _protocol: &StreamProtocol, io: &mut T) -> io::Result<Value>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response_frame_bytes).await?.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(&mut self, _protocol: &StreamProtocol, io: &mut T, request: Frame) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            Frame::Json(value) => write_frame(io, &value, self.max_frame_bytes).await,
            Frame::Shared(value) => write_frame(io, &value, self.max_frame_bytes).await,
            Frame::Malformed(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        }
    }

    async fn write_response<T>(&mut self, _protocol: &StreamProtocol, io: &mut T, response: Value) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let (buf, start) = match encode_frame_in_place(&response, self.max_response_frame_bytes) {
            Ok(encoded) => encoded,
            Err(e) => {
                tracing::warn!(error = %e, "response exceeds the frame limit; answering with an error envelope");
                let envelope = crate::service::envelope(ErrorCode::Internal, format!("response refused: {e}"));
                encode_frame_in_place(&envelope, self.max_response_frame_bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
            }
        };
        io.write_all(buf.get(start..).unwrap_or_default()).await?;
        io.flush().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::io::Cursor;
    use serde_json::json;

    use super::*;

    /// Yields at most `chunk` bytes per read: exercises split reads.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Poll::Ready(Ok(n))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    fn raw_frame(len: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_varint(len, &mut out);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn varint_round_trips_edge_values() {
        for value in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            encode_varint(value, &mut buf);
            assert!(buf.len() <= MAX_VARINT_BYTES);
            assert_eq!(decode_varint(&buf), Ok(Some((value, buf.len()))), "value {value}");
            // Every strict prefix is incomplete, never an error.
            for cut in 0..buf.len() {
                assert_eq!(decode_varint(&buf[..cut]), Ok(None), "value {value} cut {cut}");
            }
        }
    }

    #[test]
    fn varint_longer_than_ten_bytes_is_refused() {
        assert_eq!(decode_varint(&[0xff; 11]), Err(FrameError::VarintTooLong));
        assert_eq!(decode_varint(&[0x80; 10]), Err(FrameError::VarintTooLong));
        assert_eq!(decode_frame(&[0x80; 16], 1024), Err(FrameError::VarintTooLong));
    }

    #[test]
    fn varint_overflowing_u64_is_refused() {
        let mut buf = vec![0xff; 9];
        buf.push(0x02);
        assert_eq!(decode_varint(&buf), Err(FrameError::VarintOverflow));
        buf[9] = 0x7f;
        assert_eq!(decode_varint(&buf), Err(FrameError::VarintOverflow));
    }

    #[test]
    fn non_minimal_varint_is_accepted() {
        assert_eq!(decode_varint(&[0x81, 0x80, 0x00]), Ok(Some((1, 3))));
    }

    #[test]
    fn frame_round_trips_and_reports_consumed_bytes() {
        let value = json!({"operations": [{"get": {"blockIds": ["a"]}}], "expiration": 5});
        let mut buf = encode_frame(&value, 1024).unwrap();
        let frame_len = buf.len();
        buf.extend_from_slice(b"trailing");
        assert_eq!(decode_frame(&buf, 1024), Ok(Some((value, frame_len))));
    }

    #[test]
    fn partial_frames_are_incomplete_not_errors() {
        let frame = encode_frame(&json!({"k": "v".repeat(300)}), 1024).unwrap();
        for cut in 0..frame.len() {
            assert_eq!(decode_frame(&frame[..cut], 1024), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn oversize_length_is_refused_before_the_body_arrives() {
        let buf = raw_frame(1025, b"");
        assert_eq!(decode_frame(&buf, 1024), Err(FrameError::Oversize { declared_bytes: 1025, max_frame_bytes: 1024 }));
        let huge = raw_frame(u64::MAX, b"");
        assert!(matches!(decode_frame(&huge, usize::MAX), Err(FrameError::Oversize { .. }) | Ok(None)));
        assert!(matches!(decode_frame(&huge, 1024), Err(FrameError::Oversize { .. })));
        assert!(matches!(encode_frame(&json!("x".repeat(2000)), 1024), Err(FrameError::Oversize { .. })));
    }

    #[test]
    fn non_utf8_and_non_json_bodies_are_refused() {
        assert!(matches!(decode_frame(&raw_frame(2, &[0xff, 0xfe]), 1024), Err(FrameError::NotUtf8(_))));
        assert!(matches!(decode_frame(&raw_frame(5, b"hello"), 1024), Err(FrameError::NotJson(_))));
        assert!(matches!(decode_frame(&raw_frame(0, b""), 1024), Err(FrameError::NotJson(_))));
        assert!(matches!(decode_frame(&raw_frame(4, b"{} {"), 1024), Err(FrameError::NotJson(_))));
    }

    #[test]
    fn stream_reader_handles_one_byte_reads() {
        let value = json!({"operation": "update", "record": {"peers": {}, "n": 1.5}});
        for chunk in [1, 2, 3, 7, 4096] {
            let mut io = Trickle { data: encode_frame(&value, 4096).unwrap(), pos: 0, chunk };
            assert_eq!(block_on(read_frame(&mut io, 4096)).unwrap(), Ok(value.clone()), "chunk {chunk}");
        }
    }

    #[test]
    fn stream_reader_reports_malformed_frames_as_values() {
        type Expect = fn(&FrameError) -> bool;
        let cases: Vec<(Vec<u8>, Expect)> = vec![
            (vec![], |e| matches!(e, FrameError::TruncatedPrefix { received_bytes: 0 })),
            (vec![0x80, 0x80], |e| matches!(e, FrameError::TruncatedPrefix { received_bytes: 2 })),
            (raw_frame(10, b"{\"a\""), |e| {
                matches!(e, FrameError::TruncatedBody { declared_bytes: 10, received_bytes: 4 })
            }),
            (vec![0xff; 11], |e| matches!(e, FrameError::VarintTooLong)),
            (raw_frame(9 * 1024 * 1024, b"{}"), |e| matches!(e, FrameError::Oversize { .. })),
            (raw_frame(2, &[0xc3, 0x28]), |e| matches!(e, FrameError::NotUtf8(_))),
            (raw_frame(3, b"abc"), |e| matches!(e, FrameError::NotJson(_))),
        ];
        for (bytes, expected) in cases {
            let mut io = Trickle { data: bytes.clone(), pos: 0, chunk: 1 };
            let got = block_on(read_frame(&mut io, DEFAULT_REPO_MAX_FRAME_BYTES)).unwrap();
            let err = got.expect_err("malformed");
            assert!(expected(&err), "{bytes:?} gave {err:?}");
        }
    }

    #[test]
    fn oversize_prefix_reads_no_body() {
        let mut bytes = raw_frame(2 * 1024 * 1024, b"");
        let prefix_len = bytes.len();
        bytes.extend_from_slice(&[b' '; 64]);
        let mut io = Cursor::new(bytes);
        let got = block_on(read_frame(&mut io, DEFAULT_CLUSTER_MAX_FRAME_BYTES)).unwrap();
        assert!(matches!(got, Err(FrameError::Oversize { .. })));
        assert_eq!(io.position(), prefix_len as u64);
    }

    #[test]
    fn codec_turns_malformed_requests_into_frames_and_refuses_bad_responses() {
        use request_response::Codec as _;
        let protocol = StreamProtocol::new("/db-p2p/repo/1.0.0");
        let mut codec = FrameCodec::new(64);
        let mut io = Cursor::new(raw_frame(3, b"abc"));
        let request = block_on(codec.read_request(&protocol, &mut io)).unwrap();
        assert!(matches!(request, Frame::Malformed(FrameError::NotJson(_))));
        let mut io = Cursor::new(raw_frame(3, b"abc"));
        let err = block_on(codec.read_response(&protocol, &mut io)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut out = Cursor::new(Vec::new());
        let err = block_on(codec.write_request(&protocol, &mut out, Frame::Json(json!("y".repeat(100))))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(out.get_ref().is_empty());

        let mut codec = FrameCodec::new(256);
        let mut out = Cursor::new(Vec::new());
        block_on(codec.write_response(&protocol, &mut out, json!("z".repeat(300)))).unwrap();
        let (value, _) = decode_frame(out.get_ref(), 256).unwrap().unwrap();
        assert_eq!(value["error"]["code"], "internal");
    }

    #[test]
    fn a_shared_request_is_written_like_an_owned_one_and_reads_back_as_json() {
        use request_response::Codec as _;
        let protocol = StreamProtocol::new("/db-p2p/cluster/1.0.0");
        let mut codec = FrameCodec::new(1024);
        let request = json!({"operation": "update", "record": {"messageHash": "z1", "message": [1, 2]}});
        let mut owned = Cursor::new(Vec::new());
        block_on(codec.write_request(&protocol, &mut owned, Frame::Json(request.clone()))).unwrap();
        let shared = Arc::new(request.clone());
        let mut copy = Cursor::new(Vec::new());
        block_on(codec.write_request(&protocol, &mut copy, Frame::Shared(Arc::clone(&shared)))).unwrap();
        assert_eq!(copy.get_ref(), owned.get_ref());
        let mut io = Cursor::new(copy.into_inner());
        let read = block_on(codec.read_request(&protocol, &mut io)).unwrap();
        assert_eq!(read.into_json(), Ok(request.clone()));
        assert_eq!(Frame::Shared(shared).into_json(), Ok(request));
        // A shared request over the limit is refused like an owned one.
        let mut small = FrameCodec::new(16);
        let mut out = Cursor::new(Vec::new());
        let err = block_on(small.write_request(&protocol, &mut out, Frame::Shared(Arc::new(json!("y".repeat(100))))))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
