//! The loop both QEMU decoders run (the main channel's and a multifd channel's):
//! step a phase state machine until it emits a record or needs more bytes, fail for
//! good on the first error, and at the end of the input tell a stream that ended
//! where it may from one cut short.

use bytes::BytesMut;

use super::decode::Position;
use crate::error::Result;

/// What one step of a decoder's state machine did.
pub(crate) enum Step<R> {
    Emit(R),
    NeedMore,
    Continue,
}

/// Where a decoder is in its stream.
pub(crate) trait Phase {
    /// The phase a decoder stays in after an error: every error is fatal.
    const FAILED: Self;

    /// What the decoder was reading, for a truncation error.
    fn reading(&self) -> &'static str;

    /// Whether the input may end here.
    fn may_end(&self) -> bool;
}

/// A decoder's state machine: its phase, its position and one step from a phase.
pub(crate) trait Machine {
    type Phase: Phase;
    type Record;

    fn phase_mut(&mut self) -> &mut Self::Phase;

    fn position(&self) -> Position;

    /// Goes one step from `phase` (taken out of the machine) over the front of
    /// `src`; `at_end`: no more bytes will come.
    fn step(
        &mut self,
        phase: Self::Phase,
        src: &mut BytesMut,
        at_end: bool,
    ) -> Result<(Self::Phase, Step<Self::Record>)>;
}

/// Steps `machine` until it emits a record, or returns `Ok(None)` when it needs
/// more bytes.
pub(crate) fn run<M: Machine>(
    machine: &mut M,
    src: &mut BytesMut,
    at_end: bool,
) -> Result<Option<M::Record>> {
    loop {
        // A step that fails leaves `FAILED` behind.
        let phase = std::mem::replace(machine.phase_mut(), M::Phase::FAILED);
        let (next, step) = machine.step(phase, src, at_end)?;
        *machine.phase_mut() = next;
        match step {
            Step::Emit(record) => return Ok(Some(record)),
            Step::NeedMore => return Ok(None),
            Step::Continue => {}
        }
    }
}

/// [`run`] for when no more bytes will come: the remaining records, then `Ok(None)`
/// if the input ended where it may, or [`Error::Truncated`](crate::Error::Truncated)
/// (and the machine failed) if it did not.
pub(crate) fn run_eof<M: Machine>(
    machine: &mut M,
    src: &mut BytesMut,
) -> Result<Option<M::Record>> {
    match run(machine, src, true)? {
        Some(record) => Ok(Some(record)),
        None if src.is_empty() && machine.phase_mut().may_end() => Ok(None),
        None => {
            let field = machine.phase_mut().reading();
            *machine.phase_mut() = M::Phase::FAILED;
            Err(machine.position().truncated(src.len(), field))
        }
    }
}
