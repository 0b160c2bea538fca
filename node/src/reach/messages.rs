//! AutoNAT v2's messages (libp2p's autonat-v2 specification), framed as libp2p frames them: an
//! unsigned varint length, then the protobuf message. Only what the client side needs: it
//! sends a dial request and the data a server may ask for, reads the answers, and answers the
//! dial-back on the connection the server made.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// Where a client asks a server to dial it back.
pub(crate) const DIAL_REQUEST: StreamProtocol =
    StreamProtocol::new("/libp2p/autonat/2/dial-request");
/// Where the server, on the connection it dialed, sends the probe's nonce.
pub(crate) const DIAL_BACK: StreamProtocol = StreamProtocol::new("/libp2p/autonat/2/dial-back");

/// Largest dial-request message: a data message carries at most 4096 bytes.
pub(crate) const MAX_MESSAGE: usize = 4104;
/// Largest dial-back message: one fixed64 nonce.
const MAX_DIAL_BACK: usize = 10;
/// Bytes of data a server may ask for before it dials an address other than the one it sees
/// the client at (the specification's amplification guard), and per data message.
pub(crate) const DATA_MIN: u64 = 30_000;
pub(crate) const DATA_MAX: u64 = 100_000;
const DATA_CHUNK: usize = 4096;

/// The envelope of every message on a dial-request stream.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Message {
    #[prost(oneof = "Msg", tags = "1, 2, 3, 4")]
    pub(crate) msg: Option<Msg>,
}

// The specification's names.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum Msg {
    #[prost(message, tag = "1")]
    DialRequest(DialRequest),
    #[prost(message, tag = "2")]
    DialResponse(DialResponse),
    #[prost(message, tag = "3")]
    DialDataRequest(DialDataRequest),
    #[prost(message, tag = "4")]
    DialDataResponse(DialDataResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub(crate) addrs: Vec<Vec<u8>>,
    #[prost(fixed64, tag = "2")]
    pub(crate) nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialDataRequest {
    #[prost(uint32, tag = "1")]
    pub(crate) addr_idx: u32,
    #[prost(uint64, tag = "2")]
    pub(crate) num_bytes: u64,
}

/// `status` values.
pub(crate) const RESPONSE_OK: i32 = 200;
pub(crate) const REQUEST_REJECTED: i32 = 100;
pub(crate) const DIAL_REFUSED: i32 = 101;
/// `dial_status` values.
pub(crate) const DIAL_ERROR: i32 = 100;
pub(crate) const DIAL_BACK_ERROR: i32 = 101;
pub(crate) const DIAL_OK: i32 = 200;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialResponse {
    #[prost(int32, tag = "1")]
    pub(crate) status: i32,
    #[prost(uint32, tag = "2")]
    pub(crate) addr_idx: u32,
    #[prost(int32, tag = "3")]
    pub(crate) dial_status: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialDataResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialBack {
    #[prost(fixed64, tag = "1")]
    pub(crate) nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DialBackResponse {
    /// 0: OK, the only value there is.
    #[prost(int32, tag = "1")]
    pub(crate) status: i32,
}

/// Writes one length-prefixed message.
pub(crate) async fn write<M: prost::Message, S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &M,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(msg.encoded_len() + 3);
    msg.encode_length_delimited(&mut buf)
        .map_err(io::Error::other)?;
    stream.write_all(&buf).await?;
    stream.flush().await
}

/// Reads one length-prefixed message of at most `max` bytes.
pub(crate) async fn read<M: prost::Message + Default, S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> io::Result<M> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await?;
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
        if i == 9 {
            return Err(invalid("length prefix too long"));
        }
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(invalid("message too large"));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|e| invalid(&e.to_string()))
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

/// Sends the data a server asked for, in messages of at most 4096 bytes.
pub(crate) async fn send_data<S: AsyncWrite + Unpin>(stream: &mut S, bytes: u64) -> io::Result<()> {
    let mut left = usize::try_from(bytes).unwrap_or(usize::MAX);
    while left > 0 {
        let n = left.min(DATA_CHUNK);
        let msg = Message {
            msg: Some(Msg::DialDataResponse(DialDataResponse { data: vec![0; n] })),
        };
        write(stream, &msg).await?;
        left -= n;
    }
    Ok(())
}

/// Reads the nonce a server sends on the connection it dialed, and says it arrived.
pub(crate) async fn read_dial_back<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<u64> {
    let DialBack { nonce } = read(stream, MAX_DIAL_BACK).await?;
    Ok(nonce)
}

/// Answers a dial-back: the server waits for this before it tells the client how the dial went.
pub(crate) async fn answer_dial_back<S: AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
    write(stream, &DialBackResponse { status: 0 }).await?;
    stream.close().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_data_message_fits_the_limit() {
        let msg = Message {
            msg: Some(Msg::DialDataResponse(DialDataResponse {
                data: vec![0; DATA_CHUNK],
            })),
        };
        assert!(prost::Message::encoded_len(&msg) + 2 <= MAX_MESSAGE);
        let back = DialBack { nonce: u64::MAX };
        assert!(prost::Message::encoded_len(&back) <= MAX_DIAL_BACK);
    }

    #[tokio::test]
    async fn messages_survive_their_framing() {
        let req = Message {
            msg: Some(Msg::DialRequest(DialRequest {
                addrs: vec![b"\x04\x7f\x00\x00\x01".to_vec()],
                nonce: 0xdead_beef_0102_0304,
            })),
        };
        let mut buf = Vec::new();
        write(&mut futures::io::Cursor::new(&mut buf), &req)
            .await
            .expect("write");
        let got: Message = read(&mut futures::io::Cursor::new(&buf), MAX_MESSAGE)
            .await
            .expect("read");
        assert_eq!(got, req);
        let err = read::<Message, _>(&mut futures::io::Cursor::new(&buf), 4)
            .await
            .expect_err("over the limit");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
