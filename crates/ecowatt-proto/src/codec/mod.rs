//! The telemetry batch codecs: lossless for register values and `seq`,
//! columnar, with bounded encoder memory. A batch starts with its version
//! byte; [`decode`] reads every version this crate knows, forever.
//!
//! - [`v1`]: byte-level (LEB128 tokens, runs of zero deltas);
//! - [`v2`]: bit-level, per column and per block the cheapest of a few models
//!   (level, delta, delta of delta; frame of reference with patched
//!   exceptions), times as a schedule plus residuals.
//!
//! Byte layouts and vectors: `docs/protocol.md`.

use alloc::vec::Vec;
use core::fmt;

pub mod bits;
pub mod v1;
pub mod v2;

pub use v1::{CODEC_V1, encode};
pub use v2::CODEC_V2;

/// Most samples in one batch.
pub const MAX_SAMPLES: usize = 4096;

/// The codec versions this crate encodes and decodes, as a bit set (bit `v` = version `v`).
pub const SUPPORTED: u8 = 1 << CODEC_V1 | 1 << CODEC_V2;

/// The newest version in both bit sets (bit `v` = version `v`), if any.
pub fn newest_common(a: u8, b: u8) -> Option<u8> {
    let both = a & b;
    (both != 0).then(|| 7 - both.leading_zeros() as u8)
}

/// One reading of the selected registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Per-device sequence number, never reused.
    pub seq: u64,
    /// When it was read, Unix ms.
    pub unix_ms: u64,
    /// Raw values of the registers in the batch's mask, in address order.
    pub values: Vec<u16>,
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Bit `i` set: register `i` is in every sample, in address order.
    pub registers: u16,
    /// The samples, in `seq` order.
    pub samples: Vec<Sample>,
}

/// Why a batch could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// No samples, or more than [`MAX_SAMPLES`].
    BadCount {
        /// The count.
        count: usize,
    },
    /// A sample with another number of values than the mask selects.
    WidthMismatch {
        /// Index of the sample.
        index: usize,
    },
    /// `seq` not strictly increasing.
    SeqOrder {
        /// Index of the sample.
        index: usize,
    },
    /// A mask selecting registers beyond 0..=9, or none.
    BadMask {
        /// The mask.
        mask: u16,
    },
    /// A version this decoder does not know.
    UnknownVersion {
        /// The version byte.
        version: u8,
    },
    /// The bytes end before the batch does.
    Truncated,
    /// A varint longer than 10 bytes or a value out of range.
    BadValue,
    /// A run of zeros longer than what is left of its column.
    RunTooLong,
    /// Bytes after the last column.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// v2: a block's model number that does not exist for its column.
    BadModel {
        /// The model number.
        model: u8,
    },
    /// v2: a bit width beyond what its column can hold.
    BadWidth {
        /// The width, bits.
        width: u8,
    },
    /// v2: an exception count beyond its block, positions not strictly
    /// increasing, or an exception without high bits.
    BadExceptions,
    /// v2: bits after the last value that are not zero padding.
    BadPadding,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::BadCount { count } => {
                write!(f, "{count} samples is outside 1..={MAX_SAMPLES}")
            }
            CodecError::WidthMismatch { index } => {
                write!(f, "sample {index} does not match the register mask")
            }
            CodecError::SeqOrder { index } => write!(f, "sample {index}: seq does not increase"),
            CodecError::BadMask { mask } => {
                write!(f, "register mask {mask:#06x} is empty or beyond register 9")
            }
            CodecError::UnknownVersion { version } => write!(f, "codec version {version} unknown"),
            CodecError::Truncated => f.write_str("batch truncated"),
            CodecError::BadValue => f.write_str("value out of range"),
            CodecError::RunTooLong => f.write_str("zero run longer than its column"),
            CodecError::TrailingBytes { count } => write!(f, "{count} bytes after the batch"),
            CodecError::BadModel { model } => write!(f, "block model {model} unknown"),
            CodecError::BadWidth { width } => {
                write!(f, "bit width {width} too wide for its column")
            }
            CodecError::BadExceptions => f.write_str("exception count or positions impossible"),
            CodecError::BadPadding => f.write_str("padding bits are not zero"),
        }
    }
}

impl core::error::Error for CodecError {}

/// Refuses a mask that selects no register or one beyond 0..=9.
pub(crate) fn check_mask(mask: u16) -> Result<(), CodecError> {
    if mask == 0 || mask & !0x03FF != 0 {
        return Err(CodecError::BadMask { mask });
    }
    Ok(())
}

/// Checks what every encoder needs of a batch; returns the number of registers.
pub(crate) fn check_batch(mask: u16, samples: &[Sample]) -> Result<usize, CodecError> {
    check_mask(mask)?;
    if samples.is_empty() || samples.len() > MAX_SAMPLES {
        return Err(CodecError::BadCount { count: samples.len() });
    }
    let width = mask.count_ones() as usize;
    for (i, s) in samples.iter().enumerate() {
        if s.values.len() != width {
            return Err(CodecError::WidthMismatch { index: i });
        }
        if i > 0 && s.seq <= samples[i - 1].seq {
            return Err(CodecError::SeqOrder { index: i });
        }
    }
    Ok(width)
}

/// Encodes with codec `version` ([`CODEC_V1`] or [`CODEC_V2`]).
pub fn encode_as(version: u8, mask: u16, samples: &[Sample]) -> Result<Vec<u8>, CodecError> {
    match version {
        CODEC_V1 => v1::encode(mask, samples),
        CODEC_V2 => v2::encode(mask, samples),
        _ => Err(CodecError::UnknownVersion { version }),
    }
}

/// Decodes a batch of any known version, checking every bound.
pub fn decode(bytes: &[u8]) -> Result<Batch, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Truncated),
        Some(&CODEC_V2) => v2::decode(bytes),
        Some(_) => v1::decode(bytes),
    }
}

/// Test batches: `n` samples from seq 100, 5 s apart, values from `f`.
#[cfg(test)]
pub(crate) fn test_samples(n: u64, f: impl Fn(u64) -> Vec<u16>) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample { seq: 100 + i, unix_ms: 1_800_000_000_000 + 5_000 * i, values: f(i) })
        .collect()
}
