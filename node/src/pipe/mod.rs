//! Call pipes : one long-lived stream per peer carries all of our calls to it.
//!
//! A request-response exchange opens a stream, negotiates its protocol, sends one request, reads
//! one response and closes, and both ends route every message through their swarm's event loop.
//! On loopback that costs about as much as two signatures. A pipe opens once and then carries
//! tagged frames both ways, straight between the calling task and the connection: the event loop
//! is not on the path. Calls on a pipe run concurrently and answer in any order; frames queued
//! together go out in one write.
//!
//! Each side's writer also signs what it sends: calls and results queue unsigned, and those that
//! queued together are signed under one batch signature (`envelope::sign_batch`), so at 64
//! calls in flight a pipe pays about one signature per write instead of one per call. A frame
//! that goes out alone carries an ordinary (version 1) envelope.
//!
//! Frame (protocol/README.md §1): a 4-byte big-endian length of what follows, an 8-byte
//! big-endian tag, a type byte, then the body: a signed envelope ([`ENVELOPE`]: `call` or
//! `cancel` from the caller; `call-result` or a stream's last `stream-chunk` back), an unsigned
//! stream chunk payload ([`CHUNK`], callee to caller), or a window credit ([`CREDIT`], caller
//! to callee). Lengths are checked before anything is allocated. A callee's first frame is an
//! empty envelope frame tagged [`ACCEPTED`]: a pipe that ends before it was never read, so its
//! calls can go again on a new one (a callee may drop a stream it had no room to accept),
//! signed anew with what queued beside them there: the payload, and with it the call id the
//! callee's replay check keys on, stays the same.

mod caller;
mod serve;
pub(crate) mod streams;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::futures::io::{BufReader, ReadHalf, WriteHalf};
use libp2p::futures::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use skillmesh_protocol::envelope::{self};
use skillmesh_protocol::keys::CALL_PROTOCOL;
use skillmesh_protocol::{CallResult, EnvelopeError, SigningKey, Unsigned};
use tokio::sync::{mpsc, watch};

/// The stream protocol of call pipes.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new(CALL_PROTOCOL);
/// The tag of the callee's first, empty frame: it has taken the pipe and reads it.
const ACCEPTED: u64 = u64::MAX;
/// Frame type: a signed envelope.
pub(crate) const ENVELOPE: u8 = 0;
/// Frame type: an unsigned stream chunk payload (`skillmesh_protocol::stream`).
pub(crate) const CHUNK: u8 = 1;
/// Frame type: the caller takes this many more chunks of the stream with this tag (a 4-byte
/// big-endian count).
pub(crate) const CREDIT: u8 = 2;
/// Chunks a callee may send on a stream beyond those the caller has credited: the window, at
/// most 16 x 256 KiB = 4 MiB in flight per stream (protocol/README.md §1). The caller credits
/// chunks back as its reader takes them, half a window at a time.
pub(crate) const STREAM_WINDOW: u32 = 16;
/// Frames queued for a pipe's writer; callers wait (and their timeouts run) beyond this.
const WRITE_QUEUE: usize = 256;
/// Bytes gathered into one write at most.
const WRITE_BATCH: usize = 64 * 1024;
/// Each pipe reader's buffer: frames that arrive together are read from it together, and their
/// signatures checked as one batch.
const READ_BUFFER: usize = 64 * 1024;

/// A pipe's stream, split for its reader and writer tasks, which touch it no more once a read
/// has failed.
///
/// Our pipes negotiate lazily: the first call goes out with the protocol proposal, and the
/// callee's confirmation is read with its first frame. When that read fails (the callee refused
/// the protocol or dropped the stream), multistream-select leaves the stream in a state in which
/// any later write, flush or read panics ("Negotiated: Invalid state"), and the writer task may
/// still hold frames: 1,000 netsim nodes hit it. From the first failed read on, this answers
/// every use with a broken pipe instead.
struct Guarded<S> {
    inner: S,
    failed: bool,
}

fn split_guarded(stream: Stream) -> (ReadHalf<Guarded<Stream>>, WriteHalf<Guarded<Stream>>) {
    Guarded {
        inner: stream,
        failed: false,
    }
    .split()
}

impl<S> Guarded<S> {
    fn broken() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the pipe's stream failed")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(_)) = r {
            self.failed = true;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A result as the caller's pipe read it: signature checked, decoded, signed by the callee.
pub(crate) type Answer = std::result::Result<CallResult, EnvelopeError>;

/// Calls in flight per peer, both ways, and when each peer last had one: the event loop spares
/// busy and recently busy peers' connections when it trims.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    peers: Mutex<HashMap<PeerId, Busy>>,
    serving: watch::Sender<usize>,
}

#[derive(Debug)]
struct Busy {
    calls: u32,
    last: Instant,
}

impl Activity {
    fn begin(self: &Arc<Self>, peer: PeerId, serving: bool) -> ActivityGuard {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let busy = peers.entry(peer).or_insert(Busy {
            calls: 0,
            last: Instant::now(),
        });
        busy.calls += 1;
        busy.last = Instant::now();
        if serving {
            self.serving.send_modify(|n| *n += 1);
        }
        ActivityGuard {
            activity: self.clone(),
            peer,
            serving,
        }
    }

    /// Peers with a call in flight.
    pub(crate) fn busy(&self) -> Vec<PeerId> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .iter()
            .filter(|(_, b)| b.calls > 0)
            .map(|(p, _)| *p)
            .collect()
    }

    /// When `peer` last had a call in flight.
    pub(crate) fn last(&self, peer: &PeerId) -> Option<Instant> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(peer).map(|b| b.last)
    }

    /// Forgets idle peers `keep` rejects (those no longer connected), so the map stays small.
    pub(crate) fn prune(&self, keep: impl Fn(&PeerId) -> bool) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|p, b| b.calls > 0 || keep(p));
    }

    /// Waits until no inbound call is running.
    pub(crate) async fn served(&self) {
        let mut rx = self.serving.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Inbound calls running.
    pub(crate) fn serving(&self) -> usize {
        *self.serving.borrow()
    }
}

struct ActivityGuard {
    activity: Arc<Activity>,
    peer: PeerId,
    serving: bool,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut peers = self
            .activity
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(b) = peers.get_mut(&self.peer) {
            b.calls = b.calls.saturating_sub(1);
            b.last = Instant::now();
        }
        if self.serving {
            self.activity
                .serving
                .send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

// ---- framing -------------------------------------------------------------------------------------

/// A pipe frame as read: its tag, type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) tag: u64,
    pub(crate) ty: u8,
    pub(crate) body: Vec<u8>,
}

/// A pipe frame: a length-prefixed frame (the mailbox's framing) whose bytes start with the
/// tag and the type.
pub(crate) fn frame(tag: u64, ty: u8, body: &[u8]) -> Vec<u8> {
    crate::wire::encode_frame(&[&tag.to_be_bytes(), &[ty], body])
}

/// A credit frame: the caller takes `n` more chunks of the stream tagged `tag`.
fn credit(tag: u64, n: u32) -> Vec<u8> {
    frame(tag, CREDIT, &n.to_be_bytes())
}

/// Reads one frame; `None` at a clean end of stream. `max` bounds the body.
async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> io::Result<Option<Frame>> {
    let Some(bytes) = crate::wire::next_frame(io, max + 9).await? else {
        return Ok(None);
    };
    split_frame(&bytes).map(Some)
}

/// The tag, type and body of a frame's bytes.
fn split_frame(bytes: &[u8]) -> io::Result<Frame> {
    match bytes {
        [t0, t1, t2, t3, t4, t5, t6, t7, ty, body @ ..] => Ok(Frame {
            tag: u64::from_be_bytes([*t0, *t1, *t2, *t3, *t4, *t5, *t6, *t7]),
            ty: *ty,
            body: body.to_vec(),
        }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame of {} bytes has no room for its tag and type",
                bytes.len()
            ),
        )),
    }
}

/// Reads one frame, waiting for it, then those already buffered behind it, `limit` in all at
/// most: frames that arrived together are handled, and their signatures checked, together.
/// Empty at a clean end of stream.
async fn read_frames<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    max: usize,
    limit: usize,
) -> io::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    let Some(first) = read_frame(io, max).await? else {
        return Ok(frames);
    };
    frames.push(first);
    while frames.len() < limit {
        match buffered_frame(io, max)? {
            Some(f) => frames.push(f),
            None => break,
        }
    }
    Ok(frames)
}

/// The next frame, if all of it is in `io`'s buffer already; the same checks as [`read_frame`].
fn buffered_frame<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    max: usize,
) -> io::Result<Option<Frame>> {
    let buf = io.buffer();
    let Some(len) = buf.get(..4).and_then(|l| <[u8; 4]>::try_from(l).ok()) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > max + 9 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {}", max + 9),
        ));
    }
    let Some(bytes) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let f = split_frame(bytes)?;
    io.consume_unpin(4 + len);
    Ok(Some(f))
}

/// A call envelope as a pipe takes it.
#[derive(Clone, Debug)]
pub(crate) enum Request {
    /// Signed already ([`crate::Node::call_raw`]): it goes out as it is.
    Signed(Vec<u8>),
    /// Prepared by our key: the pipe's writer signs it with what queued beside it.
    Unsigned(Unsigned),
}

impl Request {
    /// The envelope signed alone, for a call that takes no pipe (one to ourselves).
    pub(crate) fn signed(self, key: &SigningKey) -> Vec<u8> {
        match self {
            Request::Signed(bytes) => bytes,
            Request::Unsigned(u) => u.sign(key),
        }
    }
}

/// What a pipe's writer is asked to do.
#[derive(Debug)]
pub(crate) enum Out {
    /// Send a frame as it is.
    Frame(Vec<u8>),
    /// Sign an envelope, with the others that queued beside it, and send it under a tag.
    Sign(u64, Unsigned),
    /// Close the stream's write side after what queued before.
    Close,
}

/// Writes queued frames, several per write when they queue up, until the queue closes, it is
/// asked to close, or a write fails; then closes the stream's write side. The envelopes of one
/// wake-up are signed together with `key`: they share one signature.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Out>,
    key: SigningKey,
) {
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    let mut closing = false;
    while !closing && rx.recv_many(&mut batch, WRITE_QUEUE).await > 0 {
        buf.clear();
        let unsigned: Vec<&Unsigned> = batch
            .iter()
            .filter_map(|o| match o {
                Out::Sign(_, u) => Some(u),
                _ => None,
            })
            .collect();
        let mut signed = envelope::sign_batch(&key, &unsigned).into_iter();
        for o in batch.drain(..) {
            let f = match o {
                Out::Frame(f) => f,
                // sign_batch gives one envelope per input, in order.
                Out::Sign(tag, _) => frame(tag, ENVELOPE, &signed.next().unwrap_or_default()),
                Out::Close => {
                    closing = true;
                    break;
                }
            };
            if !buf.is_empty() && buf.len() + f.len() > WRITE_BATCH {
                if io.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            // A large frame (a stream chunk) goes out as it is, not copied into the batch.
            if f.len() >= WRITE_BATCH {
                if io.write_all(&f).await.is_err() {
                    return;
                }
                continue;
            }
            buf.extend_from_slice(&f);
        }
        if io.write_all(&buf).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
    let _ = io.close().await;
}

pub(crate) use caller::{Pipes, StreamCall};
pub(crate) use serve::{ServeLimits, serve};
pub(crate) use streams::Streams;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::futures::io::Cursor;

    use super::*;

    fn f(tag: u64, ty: u8, body: &[u8]) -> Frame {
        Frame {
            tag,
            ty,
            body: body.to_vec(),
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_keypair(&libp2p::identity::Keypair::generate_ed25519()).expect("ed25519")
    }

    /// A call prepared by `k`, told apart by `i`.
    fn unsigned(k: &SigningKey, i: u64) -> Unsigned {
        let now = skillmesh_protocol::Timestamp::now();
        let call = skillmesh_protocol::Call {
            call_id: skillmesh_protocol::CallId([i as u8; 16]),
            caller: k.peer_id(),
            target: k.peer_id(),
            skill: skillmesh_protocol::SkillName::new("echo").expect("name"),
            version_req: "*".parse().expect("req"),
            args: serde_bytes::ByteBuf::from(skillmesh_protocol::to_cbor(&i)),
            issued_at: now,
            expires_at: now.saturating_add(Duration::from_secs(30)),
            mode: skillmesh_protocol::Mode::Sync,
            grant: None,
        };
        envelope::prepare(k, &call).expect("prepare")
    }

    #[tokio::test]
    async fn envelopes_queued_together_share_one_signature_and_keep_their_order() {
        let k = key();
        let (tx, rx) = mpsc::channel(16);
        let calls: Vec<Unsigned> = (0..5).map(|i| unsigned(&k, i)).collect();
        tx.send(Out::Frame(frame(100, CREDIT, b"as is")))
            .await
            .expect("queue");
        for (i, u) in calls.iter().enumerate() {
            tx.send(Out::Sign(i as u64, u.clone()))
                .await
                .expect("queue");
        }
        tx.send(Out::Close).await.expect("queue");
        // Past the close: never written.
        tx.send(Out::Sign(9, unsigned(&k, 9))).await.expect("queue");
        drop(tx);
        let mut out = Cursor::new(Vec::new());
        write_frames(&mut out, rx, k.clone()).await;
        let bytes = out.into_inner();
        let mut r = Cursor::new(&bytes);
        let first = read_frame(&mut r, 4096).await.expect("read");
        assert_eq!(first, Some(f(100, CREDIT, b"as is")));
        let mut signatures = Vec::new();
        for (i, u) in calls.iter().enumerate() {
            let Frame { tag, ty, body: e } = read_frame(&mut r, 4096)
                .await
                .expect("read")
                .expect("frame");
            assert_eq!((tag, ty), (i as u64, ENVELOPE));
            let v = envelope::verify(&e).expect("verifies alone");
            assert_eq!(v.signer(), k.peer_id());
            assert_eq!(v.payload(), u.payload());
            signatures.push(e[36..100].to_vec());
        }
        assert!(
            signatures.iter().all(|s| *s == signatures[0]),
            "one signature"
        );
        assert_eq!(read_frame(&mut r, 4096).await.expect("end"), None);
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused_before_allocating() {
        let f0 = frame(7, CHUNK, b"hello");
        assert_eq!(&f0[..4], &14u32.to_be_bytes());
        let got = read_frame(&mut Cursor::new(&f0), 10).await.expect("read");
        assert_eq!(got, Some(f(7, CHUNK, b"hello")));
        let f = f0;
        // Over the limit, or claiming 4 GiB with no body: refused by the length check.
        assert!(read_frame(&mut Cursor::new(&f), 4).await.is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        let err = read_frame(&mut Cursor::new(&huge), 1024)
            .await
            .expect_err("oversize");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A length too short to hold the tag and type.
        let short = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut Cursor::new(&short), 1024).await.is_err());
        // A clean end between frames is the end of the pipe; one inside a frame is an error.
        assert_eq!(
            read_frame(&mut Cursor::new(&[]), 10).await.expect("eof"),
            None
        );
        assert!(read_frame(&mut Cursor::new(&f[..6]), 10).await.is_err());
    }

    #[tokio::test]
    async fn frames_that_arrived_together_are_read_together() {
        let mut bytes = Vec::new();
        for i in 0..5u64 {
            bytes.extend(frame(i, CHUNK, &[i as u8; 3]));
        }
        // Half of a sixth frame: it waits for the next read.
        bytes.extend(&frame(5, CHUNK, &[5; 3])[..10]);
        let mut r = BufReader::with_capacity(1024, Cursor::new(bytes));
        let got = read_frames(&mut r, 10, 3).await.expect("read");
        assert_eq!(got.iter().map(|f| f.tag).collect::<Vec<_>>(), vec![0, 1, 2]);
        let got = read_frames(&mut r, 10, 64).await.expect("read");
        assert_eq!(got, vec![f(3, CHUNK, &[3; 3]), f(4, CHUNK, &[4; 3])]);
        assert!(
            read_frames(&mut r, 10, 64).await.is_err(),
            "cut inside a frame"
        );
        // A buffered frame over the limit is refused as a read one is.
        let mut big = frame(0, CHUNK, &[0; 3]);
        big.extend(frame(1, CHUNK, &[0; 30]));
        let mut r = BufReader::with_capacity(1024, Cursor::new(big));
        assert!(read_frames(&mut r, 10, 64).await.is_err());
    }

    #[tokio::test]
    async fn queued_frames_are_written_together_in_order() {
        let (tx, rx) = mpsc::channel(8);
        for i in 0..5u64 {
            tx.send(Out::Frame(frame(i, CHUNK, &[i as u8; 3])))
                .await
                .expect("queue");
        }
        drop(tx);
        let mut out = Cursor::new(Vec::new());
        write_frames(&mut out, rx, key()).await;
        let bytes = out.into_inner();
        let mut r = Cursor::new(&bytes);
        for i in 0..5u64 {
            let got = read_frame(&mut r, 10).await.expect("read");
            assert_eq!(got, Some(f(i, CHUNK, &[i as u8; 3])));
        }
        assert_eq!(read_frame(&mut r, 10).await.expect("end"), None);
    }

    /// Stands for a lazily negotiated stream: once a read failed, any later use panics.
    struct Fragile {
        failed: bool,
    }

    impl AsyncRead for Fragile {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            assert!(!self.failed, "read after a failed read");
            self.failed = true;
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Fragile {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            assert!(!self.failed, "write after a failed read");
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            assert!(!self.failed, "flush after a failed read");
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            assert!(!self.failed, "close after a failed read");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_stream_whose_read_failed_is_not_used_again() {
        let (read, write) = Guarded {
            inner: Fragile { failed: false },
            failed: false,
        }
        .split();
        let mut read = BufReader::new(read);
        assert!(read_frame(&mut read, 10).await.is_err(), "the failed read");
        let err = read_frame(&mut read, 10).await.expect_err("a second read");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        // The writer still holds a frame: it stops at the first write, without a panic.
        let (tx, rx) = mpsc::channel(8);
        tx.send(Out::Frame(frame(1, CHUNK, b"late")))
            .await
            .expect("queue");
        drop(tx);
        write_frames(write, rx, key()).await;
    }
}
