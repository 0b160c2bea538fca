//! Framing of envelopes on request-response streams: a 4-byte big-endian length, then the
//! bytes. Lengths are checked before anything is allocated.

use std::io;

use libp2p::StreamProtocol;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A codec of length-prefixed byte frames with separate request and response limits.
#[derive(Clone, Debug)]
pub(crate) struct FrameCodec {
    max_request: usize,
    max_response: usize,
}

impl FrameCodec {
    pub(crate) fn new(max_request: usize, max_response: usize) -> Self {
        FrameCodec {
            max_request,
            max_response,
        }
    }
}

/// One frame of `parts` back to back: their total length (4 bytes, big-endian), then them.
/// Callers keep frames far below 4 GiB (every limit is a few MiB).
pub(crate) fn encode_frame(parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for p in parts {
        frame.extend_from_slice(p);
    }
    frame
}

/// Reads one frame; `None` when the stream ends cleanly between frames.
pub(crate) async fn next_frame<T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match io.read_exact(&mut len[..1]).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        r => r?,
    }
    io.read_exact(&mut len[1..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    next_frame(io, max)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    data: &[u8],
    max: usize,
) -> io::Result<()> {
    if data.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is over the limit of {max}", data.len()),
        ));
    }
    // One write: two would go out as two stream frames, each its own packet.
    io.write_all(&encode_frame(&[data])).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused_before_allocating() {
        let mut buf = Vec::new();
        write_frame(&mut Cursor::new(&mut buf), b"hello", 10)
            .await
            .expect("write");
        assert_eq!(&buf[..4], &5u32.to_be_bytes());
        let got = read_frame(&mut Cursor::new(&buf), 10).await.expect("read");
        assert_eq!(got, b"hello");
        assert!(read_frame(&mut Cursor::new(&buf), 4).await.is_err());
        // A length claiming 4 GiB with no body: refused by the length check, not by OOM.
        let huge = u32::MAX.to_be_bytes();
        let err = read_frame(&mut Cursor::new(&huge[..]), 1024)
            .await
            .expect_err("oversize");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            write_frame(&mut Cursor::new(&mut Vec::new()), &[0; 11], 10)
                .await
                .is_err()
        );
    }
}
