//! A file read and written on threads of their own, so that the thread encoding
//! between them spends its time encoding: the kernel's copies and page faults
//! (about a sixth of `dedup encode` on one thread) overlap with it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};

/// Pieces in flight each way: a few MiB, whatever the file's size.
const IN_FLIGHT: usize = 4;

/// Reads `file` in pieces of `piece` bytes on a thread; the receiver gets them in
/// order, then the end (the channel closes) or an error.
pub(crate) fn read_on_a_thread(mut file: File, piece: usize) -> Receiver<io::Result<Bytes>> {
    let (pieces, received) = sync_channel(IN_FLIGHT);
    std::thread::spawn(move || {
        loop {
            let mut buf = BytesMut::zeroed(piece);
            let read = file.read(&mut buf);
            let next = match read {
                Ok(0) => return,
                Ok(n) => Ok(buf.split_to(n).freeze()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = next.is_err();
            // the receiver went away (it failed): nothing more to read for
            if pieces.send(next).is_err() || failed {
                return;
            }
        }
    });
    received
}

/// Writes what it is sent to `file` on a thread; joining it gives the first error.
/// The sender closing ends it.
pub(crate) fn write_on_a_thread(mut file: File) -> (SyncSender<Bytes>, JoinHandle<io::Result<()>>) {
    let (pieces, received) = sync_channel::<Bytes>(IN_FLIGHT);
    let writer = std::thread::spawn(move || {
        received
            .iter()
            .try_for_each(|piece| file.write_all(&piece))?;
        file.flush()
    });
    (pieces, writer)
}
