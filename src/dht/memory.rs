//! An in-process store node: the same [`Node`] interface over a map, for unit tests
//! and self-contained demos, with switches to play a node that is down or that
//! answers with wrong bytes.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use super::node::{Node, NodeFuture};

/// A store node held in this process.
#[derive(Debug, Default)]
pub struct MemoryNode {
    name: String,
    map: Mutex<HashMap<Vec<u8>, Bytes>>,
    down: AtomicBool,
    gets: AtomicU64,
}

impl MemoryNode {
    /// An empty node known by `name` in the ring.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// While `down`, every request fails as a dead server's would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the node holds no key.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Number of keys asked for by `get_many` so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Bytes>> {
        // a panic elsewhere while holding the map leaves it consistent (plain inserts)
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_up(&self) -> io::Result<()> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{} is down", self.name),
            )),
            false => Ok(()),
        }
    }
}

impl Node for MemoryNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn get_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, Vec<Option<Bytes>>> {
        Box::pin(async move {
            self.check_up()?;
            self.gets.fetch_add(keys.len() as u64, Ordering::SeqCst);
            let map = self.lock();
            Ok(keys.iter().map(|k| map.get(k).cloned()).collect())
        })
    }

    fn set_many<'a>(&'a self, entries: &'a [(Vec<u8>, Bytes)]) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            self.check_up()?;
            let mut map = self.lock();
            for (k, v) in entries {
                map.insert(k.clone(), v.clone());
            }
            Ok(())
        })
    }

    fn delete_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            self.check_up()?;
            let mut map = self.lock();
            keys.iter().for_each(|k| {
                map.remove(k);
            });
            Ok(())
        })
    }
}
