//! Page resolvers: the pluggable ways a page travels in less than its own size.
//!
//! On the source side a chain of [`Claim`]s is offered each guest page in turn; the
//! first that can describe it compactly writes a *body* and the page travels as
//! `(tag, body)`. On the destination side the [`Restore`] registered under the same
//! tag turns the body back into the page. Pages nobody claims travel raw inside the
//! dedup stream's compressed batches. Both sides see every delivered page, in stream
//! order, through `delivered`, so resolvers that remember pages (seen-before) keep
//! their two halves in step without talking to each other.
//!
//! A new resolver plugs in without touching the codecs: implement both traits with a
//! tag from [`CUSTOM_TAGS`] and add them to the encoder's and decoder's resolver lists.
//!
//! ```
//! use migstream::resolve::{Claim, Page, PageAt, PageOut, Restore};
//!
//! /// Pages whose bytes count up 0, 1, 2, ... (mod 256) travel as an empty body.
//! struct Ramp;
//!
//! fn is_ramp(page: &[u8]) -> bool {
//!     page.iter().enumerate().all(|(i, &b)| b == i as u8)
//! }
//!
//! impl Claim for Ramp {
//!     fn tag(&self) -> u8 { 0x80 }
//!     fn claim(&mut self, page: &Page<'_>, _body: &mut Vec<u8>) -> bool { is_ramp(page.data) }
//! }
//!
//! impl Restore for Ramp {
//!     fn tag(&self) -> u8 { 0x80 }
//!     fn restore(&mut self, _at: PageAt<'_>, _body: &[u8], out: &mut PageOut<'_>) -> migstream::Result<()> {
//!         out.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
//!         Ok(())
//!     }
//! }
//! ```

mod fill;
mod out;
mod seen;
mod template;
mod xbzrle;

pub use fill::Fill;
pub use out::PageOut;
pub use seen::{SeenBefore, SeenBeforeRestore};
pub use template::{TemplateClaim, TemplateRestore, TemplateStore};
pub use xbzrle::{DEFAULT_CACHE_BYTES, XbzrleDelta, XbzrleRestore};

use std::cell::OnceCell;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;

use crate::error::Result;
use crate::page;

/// The share of a main channel's memory a resolver keeps on a multifd channel
/// ([`Claim::on_multifd_channel`]): QEMU spreads a migration's pages over its
/// channels, so four channels with a quarter each span about the pages one main
/// channel would, and a migration of many channels stays bounded.
pub const MULTIFD_CHANNEL_SHARE: usize = 4;

/// Tags free for resolvers outside this crate.
pub const CUSTOM_TAGS: RangeInclusive<u8> = 0x80..=0xFF;

/// Checks that the resolvers of one end have distinct tags, each a built-in page tag
/// with a resolver (FILL, SEEN, TEMPLATE, XBZRLE) or a custom one
/// ([`CUSTOM_TAGS`]): a reserved tag would be blamed on the peer at the far end.
pub(crate) fn check_tags(tags: impl IntoIterator<Item = u8>) -> Result<()> {
    let mut seen = [false; 256];
    for t in tags {
        let built_in = (tag::FILL..=tag::XBZRLE).contains(&t);
        if !built_in && !CUSTOM_TAGS.contains(&t) {
            return Err(crate::Error::Config {
                what: "resolvers",
                reason: format!("tag {t:#04x} is reserved (custom resolvers take 0x80-0xff)"),
            });
        }
        if std::mem::replace(&mut seen[usize::from(t)], true) {
            return Err(crate::Error::Config {
                what: "resolvers",
                reason: format!("two resolvers for tag {t:#04x}"),
            });
        }
    }
    Ok(())
}

/// Entry tags of the built-in resolvers (see `docs/wire-format.md`).
pub mod tag {
    /// A page sent whole (inside a compressed batch): what nobody claimed.
    pub const RAW: u8 = 0x01;
    /// A page filled with one byte value.
    pub const FILL: u8 = 0x02;
    /// A page whose bytes were already delivered earlier in this migration.
    pub const SEEN: u8 = 0x03;
    /// A page of the template catalog both ends hold.
    pub const TEMPLATE: u8 = 0x04;
    /// An XBZRLE delta against the last version of the same page delivered.
    pub const XBZRLE: u8 = 0x05;

    /// The built-in page tags and their names, for reports.
    pub const NAMED: [(&str, u8); 5] = [
        ("raw", RAW),
        ("fill", FILL),
        ("seen", SEEN),
        ("template", TEMPLATE),
        ("xbzrle", XBZRLE),
    ];
}

/// Where a guest page lives: its RAM block and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageAt<'a> {
    /// The RAM block's name.
    pub block: &'a [u8],
    /// Byte offset of the page in its block.
    pub offset: u64,
}

/// A guest page and its bytes.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// Where it lives.
    pub at: PageAt<'a>,
    /// The page's bytes (one target page).
    pub data: &'a [u8],
    /// [`page::prefilter`] of `data`, once a resolver asked for it.
    prefilter: OnceCell<u64>,
    /// The tag of the entry the page travelled as, once delivered.
    tag: Option<u8>,
}

impl<'a> Page<'a> {
    /// The page at `at` with bytes `data`.
    pub fn new(at: PageAt<'a>, data: &'a [u8]) -> Self {
        Self {
            at,
            data,
            prefilter: OnceCell::new(),
            tag: None,
        }
    }

    /// The same page, as delivered in an entry of `tag`.
    pub(crate) fn delivered_as(mut self, tag: u8) -> Self {
        self.tag = Some(tag);
        self
    }

    /// The tag of the entry the page travelled as ([`tag::RAW`] if no resolver
    /// claimed it): known in `delivered`, `None` while the page is offered to claims.
    pub fn tag(&self) -> Option<u8> {
        self.tag
    }

    /// The page's [`page::prefilter`] value. Computed at the first call and kept:
    /// every resolver that looks pages up in a set (templates, seen-before) asks,
    /// and hashing the page once costs about as much as all their lookups.
    pub fn prefilter(&self) -> u64 {
        *self.prefilter.get_or_init(|| page::prefilter(self.data))
    }
}

/// The source half of a resolver: describes pages compactly.
pub trait Claim: Send {
    /// The entry tag its bodies travel under; the matching [`Restore`] has the same.
    fn tag(&self) -> u8;

    /// Claims `page` if this resolver can describe it: appends the body to `body`
    /// (empty on entry) and returns true. Returns false, leaving `body` empty, if not.
    fn claim(&mut self, page: &Page<'_>, body: &mut Vec<u8>) -> bool;

    /// Called for every page delivered, whoever claimed it, in stream order.
    fn delivered(&mut self, _page: &Page<'_>) {}

    /// Called once, before the first page, when the stream carries one of QEMU's
    /// multifd channels rather than its main channel: a resolver that keeps pages of
    /// its stream keeps 1 / [`MULTIFD_CHANNEL_SHARE`] of what it keeps on a main
    /// channel. Its [`Restore`] half must do the same.
    fn on_multifd_channel(&mut self) {}
}

/// The destination half of a resolver: rebuilds pages from bodies.
pub trait Restore: Send {
    /// The entry tag it restores; the same as its [`Claim`] half's.
    fn tag(&self) -> u8;

    /// Writes the page at `at` that `body` describes into `out`. Any error fails the
    /// migration: a page that cannot be restored exactly is never guessed.
    fn restore(&mut self, at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()>;

    /// Sees the body of every page of this tag in a frame before any page of the
    /// frame is restored, and says whether [`restore`](Self::restore) can run on it
    /// now. A resolver that fetches pages from elsewhere (a DHT ring of store nodes)
    /// notes what it lacks and returns false: the decoder then stops before the frame
    /// ([`Decoded::Fetch`](crate::dedup::Decoded::Fetch)) so that
    /// everything the frame needs is fetched in one batch, and tries again on the next
    /// `decode`. Local resolvers keep the default.
    fn prepare(&mut self, _body: &[u8]) -> Result<bool> {
        Ok(true)
    }

    /// Called before the first [`prepare`](Self::prepare) of a frame's pages. The
    /// decoder prepares frames in stream order, and at most one ahead of the frame it
    /// restores, so that fetching the next frame's pages overlaps restoring this
    /// one: between a frame's `begin_frame` and its [`end_frame`](Self::end_frame)
    /// the next frame may begin, be prepared and be fetched for. What a resolver
    /// keeps for a frame it keeps until that frame's `end_frame`.
    fn begin_frame(&mut self) {}

    /// Called once every page of the oldest frame begun is restored, or the
    /// decoder gave up on it: what was kept for that frame alone may go.
    fn end_frame(&mut self) {}

    /// Called with every page delivered, whoever restored it, in stream order.
    fn delivered(&mut self, _page: &Page<'_>) {}

    /// The counterpart of [`Claim::on_multifd_channel`], called on the same streams.
    fn on_multifd_channel(&mut self) {}
}

/// The asynchronous half of a resolver that fetches pages from elsewhere: what its
/// [`Restore`] half found missing in [`Restore::prepare`], fetched in one batch.
///
/// An async driver of a [`DedupDecoder`](crate::dedup::DedupDecoder) calls `fetch`
/// whenever the decoder asks for it ([`Decoded::Fetch`](crate::dedup::Decoded::Fetch)), then
/// decodes again; or decodes while the fetch runs, to restore the frames before the
/// one that waits meanwhile (see [`Decoded::Fetch`](crate::dedup::Decoded::Fetch)).
/// A fetch may therefore run while the paired `Restore` prepares and restores
/// pages: their shared state must allow it.
pub trait Fetch: Send {
    /// Fetches every page the paired `Restore` is waiting for. An error fails the
    /// migration (after the fetcher's own retries and replicas).
    fn fetch(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}
