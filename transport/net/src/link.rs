//! A link over any ordered byte stream (TCP connection, QUIC stream, in-memory pipe):
//! authentication, then a reader task that decodes frames and a writer task that encodes them.
//! The link knows nothing of sessions: it moves frames between the socket and the endpoint task.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use phalanx_proto::{
    frame::{Header, HEADER_LEN},
    ChannelId, DecodeError, Epoch, Frame, FrameDecoder, FrameFlags, FrameKind, FrameVerifier, Handshake,
    HandshakeError, HandshakeStep, LinkId, LinkIdentity, PostedWrite, RankId, Role,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::driver::PlacerSlot;
use crate::faults::{PathFaults, WriteVerdict};
use crate::message_buf::MessageWriter;
use crate::recv_pool::RecvPool;

/// Bytes read per socket read at least, for headers and small frames.
const READ_CHUNK: usize = 64 << 10;
/// Write buffer for small frames; large payloads bypass it.
const WRITE_BUFFER: usize = 256 << 10;

/// Why a link could not be set up.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer failed authentication or spoke another protocol.
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer closed the connection during the handshake (often: it refused our
    /// credentials).
    #[error("peer closed the connection during the handshake (it may have refused our credentials)")]
    ClosedDuringHandshake,
    /// TLS refused the peer's certificate, or the peer refused ours.
    #[error("TLS refused the connection: {0}")]
    TlsRefused(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
}

/// Runs the authentication handshake. Returns the authenticated peer and any bytes that arrived
/// after it (the first frames).
pub(crate) async fn authenticate<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut hs: Handshake,
    timeout: Duration,
) -> Result<(LinkIdentity, BytesMut), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let run = async {
        writer.write_all(&hs.hello()).await?;
        writer.flush().await?;
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if !buf.is_empty() {
                match hs.handle_bytes(&mut buf)? {
                    HandshakeStep::Continue(out) => {
                        if !out.is_empty() {
                            writer.write_all(&out).await?;
                            writer.flush().await?;
                        }
                    }
                    HandshakeStep::Authenticated { peer, send } => {
                        if !send.is_empty() {
                            writer.write_all(&send).await?;
                            writer.flush().await?;
                        }
                        return Ok((peer, buf));
                    }
                }
            }
            if reader.read_buf(&mut buf).await? == 0 {
                return Err(LinkError::ClosedDuringHandshake);
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::HandshakeTimeout(timeout)),
    }
}

/// What link tasks tell the endpoint task.
#[derive(Debug)]
pub(crate) enum LinkInput {
    Frame(LinkId, Frame),
    DecodeError(LinkId, DecodeError),
    Closed(LinkId),
}

/// Payloads at least this large are read straight into a pooled buffer of their own.
const DIRECT_READ: usize = 64 << 10;
/// Largest read of a large payload: each read's bytes are checksummed right after it, while
/// the kernel's copy left them in the CPU's cache (a 1 MiB frame read whole and checksummed
/// after is read again from further out: docs/performance.md).
const VERIFY_SLICE: usize = 256 << 10;
/// Bytes of idle receive buffers kept per link.
const POOL_BYTES: usize = 64 << 20;
/// Messages of this many bytes and more, up to [`IN_ORDER_MAX`], are read into one buffer of
/// their own while their frames arrive in order on one link (see `crate::message_buf`).
const IN_ORDER_MIN: u64 = 256 << 10;
/// Largest message read into one buffer: the length is the peer's word until the last frame is
/// in, and the buffer is allocated on the first.
const IN_ORDER_MAX: u64 = 256 << 20;

/// The next frame of a message a link is reading: whose message it is, and that frame's
/// sequence number.
struct NextFrame {
    src: RankId,
    channel: ChannelId,
    epoch: Epoch,
    /// The message's length (every frame of it carries it).
    total: u64,
    seq: u64,
}

impl NextFrame {
    /// The frame after `h` in `h`'s message.
    fn after(h: &Header) -> NextFrame {
        NextFrame { src: h.src, channel: h.channel, epoch: h.epoch, total: h.aux, seq: h.seq + 1 }
    }

    /// Whether `h` is this frame (a data frame that does not start a message).
    fn is(&self, h: &Header) -> bool {
        h.kind == FrameKind::Data
            && !h.flags.contains(FrameFlags::FIRST)
            && (h.src, h.channel, h.epoch, h.seq, h.aux) == (self.src, self.channel, self.epoch, self.seq, self.total)
    }
}

/// A message being read into one buffer, and its next frame.
struct InOrder {
    writer: MessageWriter,
    next: NextFrame,
}

impl InOrder {
    /// Whether `h` is the next frame of this message, and its `len` bytes fit.
    fn continues(&self, h: &Header, len: usize) -> bool {
        self.next.is(h) && len <= self.writer.remaining()
    }
}

/// Where a data frame's payload goes.
enum Placement {
    /// A buffer of its own (small frames: a slice of the read buffer).
    Own,
    /// The next bytes of the message being read into one buffer.
    Message,
}

/// Decides where the payload of a frame with header `h` and `len` bytes goes, starting or
/// dropping the one-buffer read of a message as needed. A frame of the message out of order (it
/// went by another path, or was lost here) ends the one-buffer read: the message's frames are
/// then delivered as they are, which is always correct.
fn place(in_order: &mut Option<InOrder>, h: &Header, len: usize, me: RankId, pool: &Arc<RecvPool>) -> Placement {
    if h.kind != FrameKind::Data {
        return Placement::Own;
    }
    if in_order.as_ref().is_some_and(|m| m.continues(h, len)) {
        return Placement::Message;
    }
    let starts = h.flags.contains(FrameFlags::FIRST)
        && !h.flags.contains(FrameFlags::LAST)
        && h.dst == me
        && (IN_ORDER_MIN..=IN_ORDER_MAX).contains(&h.aux)
        && len as u64 <= h.aux;
    if starts {
        // Its first frame is the next one: it is about to be written.
        let next = NextFrame { seq: h.seq, ..NextFrame::after(h) };
        *in_order = Some(InOrder { writer: MessageWriter::new(pool.take(h.aux as usize)), next });
        return Placement::Message;
    }
    // A later frame of the same peer: ours is incomplete for good (an earlier one is a
    // retransmission or a duplicate and leaves it be).
    if in_order.as_ref().is_some_and(|m| m.next.src == h.src && h.seq >= m.next.seq) {
        *in_order = None;
    }
    Placement::Own
}

/// The frame of a payload just written into the message buffer: the payload becomes its slice
/// of the buffer, and the last frame carries the whole message.
fn committed(in_order: &mut Option<InOrder>, header: Header, len: usize) -> Frame {
    let m = in_order.as_mut().expect("placed into the message");
    let payload = m.writer.commit(len);
    m.next.seq += 1;
    let mut message = None;
    if header.flags.contains(FrameFlags::LAST) {
        message = m.writer.whole();
        *in_order = None;
    }
    Frame { header, payload, payload_crc: None, message }
}

/// Messages whose data is at least this large may be read into a place the application posted.
const POSTED_MIN: u64 = 256 << 10;
/// Largest first frame offered to the application's placer (its header).
const POSTED_HEAD_MAX: usize = 64;

/// A message whose data this link reads into a place the application posted for it (see
/// `phalanx_proto::posting`): the claim on it, and the frame the data comes in.
struct PostedNext {
    write: PostedWrite,
    next: NextFrame,
}

impl PostedNext {
    /// Whether `h` is the message's data frame (its last), and its `len` bytes are what was
    /// posted.
    fn continues(&self, h: &Header, len: usize) -> bool {
        self.next.is(h) && h.flags.contains(FrameFlags::LAST) && len == self.write.len()
    }
}

/// For a message's small first frame (`h`, `head`) whose data follows as one large frame: the
/// application's posting for that data, claimed, if it has one.
fn try_post(placer: &PlacerSlot, h: &Header, head: &[u8], me: RankId) -> Option<PostedNext> {
    let first = h.flags.contains(FrameFlags::FIRST) && !h.flags.contains(FrameFlags::LAST);
    if h.kind != FrameKind::Data || !first || h.dst != me || head.len() > POSTED_HEAD_MAX {
        return None;
    }
    let rest = h.aux.checked_sub(head.len() as u64).filter(|r| *r >= POSTED_MIN)?;
    let placer = placer.read().unwrap_or_else(|e| e.into_inner()).clone()?;
    let write = placer.place(h.src, h.channel, head, usize::try_from(rest).ok()?)?;
    Some(PostedNext { write, next: NextFrame::after(h) })
}

/// How reading a data frame into a posting ended.
enum PostedRead {
    /// Read and verified: the frame, its payload in the posting.
    Frame(Frame),
    /// The frame's bytes are consumed but not delivered: the application took the posting back
    /// (the message came by another path), or a fault injector dropped the read.
    Dropped,
    /// The frame failed its checksum.
    Corrupt(DecodeError),
    /// The stream ended or failed.
    Closed,
}

/// Reads the `len` payload bytes of the data frame `header` (the header's bytes `head`, its
/// checksum `crc`) into the posting `write`: what `buf` already holds, then straight from the
/// socket, each read checksummed while the posting cannot be taken back. If it is taken back
/// mid-frame, the rest of the frame is read and dropped.
async fn read_posted<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    mut write: PostedWrite,
    (head, header, crc, len): (&[u8], Header, u32, usize),
    discard: impl Fn() -> bool,
) -> PostedRead {
    let mut verifier = FrameVerifier::new(head);
    let mut at = buf.len().min(len);
    let mut kept = write
        .write(0..at, |dst| {
            dst.copy_from_slice(&buf[..at]);
            verifier.update(dst);
        })
        .is_some();
    buf.advance(at);
    let mut scratch = Vec::new();
    while at < len {
        let end = (at + VERIFY_SLICE).min(len);
        let read = if kept {
            std::future::poll_fn(|cx| {
                write
                    .write(at..end, |dst| {
                        let mut rb = ReadBuf::new(dst);
                        match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) => {
                                verifier.update(rb.filled());
                                Poll::Ready(Ok(Some(rb.filled().len())))
                            }
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            Poll::Pending => Poll::Pending,
                        }
                    })
                    .unwrap_or(Poll::Ready(Ok(None)))
            })
            .await
        } else {
            scratch.resize(end - at, 0);
            reader.read(&mut scratch).await.map(Some)
        };
        match read {
            Ok(Some(0)) | Err(_) => return PostedRead::Closed,
            Ok(Some(n)) => at += n,
            // Taken back: the rest of the frame is read into scratch space.
            Ok(None) => kept = false,
        }
    }
    if !kept || discard() {
        return PostedRead::Dropped;
    }
    match verifier.finish(crc) {
        Ok(payload_crc) => match write.finish() {
            Some(payload) => {
                PostedRead::Frame(Frame { header, payload, payload_crc: Some(payload_crc), message: None })
            }
            None => PostedRead::Dropped,
        },
        Err(e) => PostedRead::Corrupt(e),
    }
}

/// Reads frames until the stream ends or fails; reports each to the endpoint task.
///
/// Small frames are split off a shared read buffer without copying; large payloads are read
/// directly into a pooled buffer (one copy, from the kernel), and the frames of a large
/// message that arrive in order into one buffer for the whole message (see
/// `crate::message_buf`), or — a message's data for which the application posted a place
/// (`placer`; see `phalanx_proto::posting`) — into that place. Checksums are verified here, so
/// the endpoint only ever sees intact frames.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut buf: BytesMut,
    link: LinkId,
    me: RankId,
    decoder: FrameDecoder,
    faults: Option<PathFaults>,
    to_endpoint: mpsc::UnboundedSender<crate::driver::Command>,
    placer: PlacerSlot,
) {
    let send = |input: LinkInput| to_endpoint.send(crate::driver::Command::Link(input)).is_ok();
    let pool = RecvPool::new(POOL_BYTES);
    let discard = || faults.as_ref().is_some_and(|f| f.discard_reads());
    let mut in_order: Option<InOrder> = None;
    let mut posted: Option<PostedNext> = None;
    loop {
        // Small frames: decode whatever the buffer holds.
        loop {
            if buf.len() >= HEADER_LEN {
                match decoder.decode_header(&buf) {
                    Ok((_, len, _)) if len as usize >= DIRECT_READ => break,
                    Ok(_) => {}
                    Err(e) => {
                        debug!(%link, error = %e, "fatal decode error");
                        send(LinkInput::DecodeError(link, e));
                        return;
                    }
                }
            }
            match decoder.decode(&mut buf) {
                Ok(Some(mut frame)) => {
                    let len = frame.payload.len();
                    let h = &frame.header;
                    // Any other data frame of that peer ends the wait for a posted message's data.
                    if h.kind == FrameKind::Data && posted.as_ref().is_some_and(|p| p.next.src == h.src) {
                        posted = None;
                    }
                    if let Some(p) = try_post(&placer, h, &frame.payload, me) {
                        if in_order.as_ref().is_some_and(|m| m.next.src == h.src) {
                            in_order = None;
                        }
                        posted = Some(p);
                    } else if let Placement::Message = place(&mut in_order, &frame.header, len, me, &pool) {
                        let m = in_order.as_mut().expect("placed into the message");
                        m.writer.next_mut(len).copy_from_slice(&frame.payload);
                        frame = committed(&mut in_order, frame.header, len);
                    }
                    if !send(LinkInput::Frame(link, frame)) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_recoverable() => {
                    if !send(LinkInput::DecodeError(link, e)) {
                        return;
                    }
                }
                Err(e) => {
                    debug!(%link, error = %e, "fatal decode error");
                    send(LinkInput::DecodeError(link, e));
                    return;
                }
            }
        }
        // A large frame: its header is buffered; read the payload into a buffer of its own.
        if buf.len() >= HEADER_LEN {
            let Ok((header, len, crc)) = decoder.decode_header(&buf) else { unreachable!("checked above") };
            let head = buf.split_to(HEADER_LEN);
            let len = len as usize;
            if let Some(p) = posted.take().filter(|p| p.continues(&header, len)) {
                let input = match read_posted(&mut reader, &mut buf, p.write, (&head, header, crc, len), discard).await
                {
                    PostedRead::Frame(frame) => LinkInput::Frame(link, frame),
                    PostedRead::Dropped => {
                        if discard() {
                            buf.clear();
                        }
                        continue;
                    }
                    PostedRead::Corrupt(e) => LinkInput::DecodeError(link, e),
                    PostedRead::Closed => {
                        send(LinkInput::Closed(link));
                        return;
                    }
                };
                if !send(input) {
                    return;
                }
                continue;
            }
            let mut own = match place(&mut in_order, &header, len, me, &pool) {
                Placement::Own => Some(pool.take(len)),
                Placement::Message => None,
            };
            let dst = match (&mut own, &mut in_order) {
                (Some(p), _) => p.as_mut_slice(),
                (None, Some(m)) => m.writer.next_mut(len),
                (None, None) => unreachable!("placed into the message"),
            };
            let mut at = buf.len().min(len);
            dst[..at].copy_from_slice(&buf[..at]);
            buf.advance(at);
            let mut verifier = FrameVerifier::new(&head);
            verifier.update(&dst[..at]);
            while at < len {
                let end = (at + VERIFY_SLICE).min(len);
                match reader.read(&mut dst[at..end]).await {
                    Ok(0) | Err(_) => {
                        send(LinkInput::Closed(link));
                        return;
                    }
                    Ok(n) => {
                        verifier.update(&dst[at..at + n]);
                        at += n;
                    }
                }
            }
            if discard() {
                buf.clear();
                continue;
            }
            // A frame that fails its checksum is not committed: its retransmission takes the
            // same place.
            let input = match verifier.finish(crc) {
                // The payload's own checksum goes up with it: a forwarded payload is sent on
                // without being read again.
                Ok(payload_crc) => LinkInput::Frame(
                    link,
                    match own {
                        Some(p) => Frame { header, payload: p.freeze(), payload_crc: Some(payload_crc), message: None },
                        None => Frame { payload_crc: Some(payload_crc), ..committed(&mut in_order, header, len) },
                    },
                ),
                Err(e) => LinkInput::DecodeError(link, e),
            };
            if !send(input) {
                return;
            }
            continue;
        }
        buf.reserve(READ_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                send(LinkInput::Closed(link));
                return;
            }
            Ok(_) => {
                if discard() {
                    buf.clear();
                }
            }
        }
    }
}

/// Writes frames from `frames` until the channel closes (the endpoint dropped the link) or the
/// socket fails.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    link: LinkId,
    faults: Option<PathFaults>,
    to_endpoint: mpsc::UnboundedSender<crate::driver::Command>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let mut held: Option<([u8; phalanx_proto::frame::HEADER_LEN], Bytes)> = None;
    let result: io::Result<()> = async {
        while let Some(frame) = frames.recv().await {
            let header = frame.encode_header();
            let mut payload = frame.payload;
            if let Some(f) = &faults {
                let delay = f.delay();
                if !delay.is_zero() {
                    w.flush().await?;
                    tokio::time::sleep(delay).await;
                }
                let is_data = frame.header.kind == FrameKind::Data;
                match f.on_write(is_data, (header.len() + payload.len()) as u64, payload.len()) {
                    WriteVerdict::Write => {}
                    WriteVerdict::Discard => continue,
                    WriteVerdict::Corrupt(i) => {
                        let mut copy = BytesMut::from(&payload[..]);
                        copy[i] ^= 0x20;
                        payload = copy.freeze();
                    }
                    WriteVerdict::Hold => {
                        // Swap each pair: hold one frame, write it after the next.
                        match held.take() {
                            Some((h, p)) => {
                                write_frame(&mut w, &header, &payload).await?;
                                write_frame(&mut w, &h, &p).await?;
                            }
                            None => held = Some((header, payload)),
                        }
                        if frames.is_empty() {
                            if let Some((h, p)) = held.take() {
                                write_frame(&mut w, &h, &p).await?;
                            }
                            w.flush().await?;
                        }
                        continue;
                    }
                }
            }
            write_frame(&mut w, &header, &payload).await?;
            // A frame held for reordering goes out after this one (reordering was switched off).
            if let Some((h, p)) = held.take() {
                write_frame(&mut w, &h, &p).await?;
            }
            if frames.is_empty() {
                w.flush().await?;
            }
        }
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        let _ = to_endpoint.send(crate::driver::Command::Link(LinkInput::Closed(link)));
    }
}

/// Payloads at least this large skip the write buffer: header and payload go out in one
/// vectored write, without copying the payload.
const DIRECT_WRITE: usize = 64 << 10;

/// Writes one encoded frame: small ones through the buffer, large ones with a vectored write.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, header: &[u8], payload: &[u8]) -> io::Result<()> {
    if payload.len() < DIRECT_WRITE {
        w.write_all(header).await?;
        return w.write_all(payload).await;
    }
    w.flush().await?;
    let inner = w.get_mut();
    let (mut h, mut p) = (header, payload);
    while !h.is_empty() || !p.is_empty() {
        let n = if h.is_empty() {
            inner.write(p).await?
        } else {
            inner.write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(p)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < h.len() {
            h = &h[n..];
        } else {
            p = &p[n - h.len()..];
            h = &[];
        }
    }
    Ok(())
}

/// Starts the reader and writer tasks of an authenticated link and registers it with the
/// endpoint task. Returns a receiver that completes when the link is gone.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_link<R, W>(
    node: &crate::driver::NodeHandle,
    reader: R,
    writer: W,
    leftover: BytesMut,
    peer: LinkIdentity,
    kind: &'static str,
    faults: Option<PathFaults>,
) -> tokio::sync::oneshot::Receiver<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let link = node.allocate_link_id();
    let span = tracing::info_span!("link", rank = %node.rank(), %link, peer = %peer.rank, kind);
    let (frame_tx, frame_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let decoder = FrameDecoder::new(node.max_payload());
    let to_endpoint = node.command_sender();
    let reader_task = tokio::spawn(
        read_loop(
            reader,
            leftover,
            link,
            node.rank(),
            decoder,
            faults.clone(),
            to_endpoint.clone(),
            node.placer_slot(),
        )
        .instrument(span.clone()),
    );
    tokio::spawn(write_loop(writer, frame_rx, link, faults, to_endpoint.clone()).instrument(span));
    let _ = to_endpoint.send(crate::driver::Command::LinkUp {
        link,
        peer,
        writer: frame_tx,
        reader: reader_task.abort_handle(),
        closed: closed_tx,
    });
    closed_rx
}

/// The rank a dialer expects on the other end.
pub(crate) fn handshake_for(node: &crate::driver::NodeHandle, role: Role, expected: Option<RankId>) -> Handshake {
    Handshake::new(role, node.identity(), expected, node.secret(), node.nonce())
}
