//! A socket's receive side that holds no buffer while the peer is quiet.
//!
//! tungstenite reads into a buffer it allocates up front and keeps for the
//! socket's life (`read_buffer_size`), and reads at most that much per
//! call. A large buffer makes every idle socket pay for it; a small one
//! makes a large message cost a system call per few hundred bytes.
//! [`ReadAhead`] sits under tungstenite and takes both: tungstenite keeps a
//! small buffer, and each read from the socket here asks the kernel for up
//! to [`BURST`] bytes into scratch space on the stack, hands tungstenite
//! what fits and keeps the rest in a spill buffer of exactly that size,
//! which is freed as soon as it has been handed on. Must not look at the
//! bytes (framing is tungstenite's) or touch the write side, which passes
//! straight through.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one read asks the kernel for: a publish of 100 × 200 B
/// events (≈ 21 KB) arrives in one system call.
pub(crate) const BURST: usize = 32 * 1024;

/// `io` with reads taken from the kernel in bursts. See the module docs.
pub(crate) struct ReadAhead<S> {
    io: S,
    /// Bytes read from the socket and not yet handed on, from `start`.
    spill: Option<Box<[u8]>>,
    start: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(io: S) -> ReadAhead<S> {
        ReadAhead {
            io,
            spill: None,
            start: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(spill) = &this.spill {
            let n = buf.remaining().min(spill.len() - this.start);
            buf.put_slice(&spill[this.start..this.start + n]);
            this.start += n;
            if this.start == spill.len() {
                this.spill = None;
                this.start = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || buf.remaining() >= BURST {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); BURST];
        let mut burst = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut burst))?;
        let got = burst.filled();
        let n = buf.remaining().min(got.len());
        buf.put_slice(&got[..n]);
        if n < got.len() {
            this.spill = Some(got[n..].into());
            this.start = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_once_and_in_order() {
        let (mut tx, rx) = tokio::io::duplex(BURST * 4);
        let sent: Vec<u8> = (0..BURST * 3 + 777).map(|i| (i % 251) as u8).collect();
        tx.write_all(&sent).await.unwrap();
        drop(tx);
        let mut r = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 500];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            // Never more than one burst is held back.
            assert!(r.spill.as_ref().map_or(0, |s| s.len()) <= BURST);
        }
        assert_eq!(got, sent);
        assert!(r.spill.is_none(), "nothing is held once all is handed on");
    }

    #[tokio::test]
    async fn a_read_holds_nothing_back_when_the_reader_takes_it_all() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tx.write_all(b"hello").await.unwrap();
        let mut r = ReadAhead::new(rx);
        let mut chunk = [0u8; 64];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 5);
        assert_eq!(&chunk[..5], b"hello");
        assert!(r.spill.is_none());
        // Writes pass straight through.
        r.write_all(b"back").await.unwrap();
        let mut echo = [0u8; 4];
        tx.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"back");
    }
}
