//! The telemetry batch codec v1: lossless, columnar, delta-coded, with runs of
//! zero deltas collapsed, so constant night data costs almost nothing and a
//! sunny day about a byte per value. Byte layout and vectors: `docs/protocol.md`.
//!
//! ```text
//! u8 version (1) | u16 register mask | varint count | varint first_seq | varint first_ms
//! | column seq gaps | column ms deltas-of-deltas | one column per register (first value, deltas)
//! ```
//! A column is a token stream of LEB128 varints: `v << 1` is a literal (zigzag
//! where signed), `n << 1 | 1` a run of `n` zeros.
//!
//! The encoder keeps O(1) state besides its output (a few integers per column);
//! the output is at most `12 + count * (2 + 3 * registers) * 10` bytes.

use alloc::vec::Vec;

use super::{Batch, CodecError, MAX_SAMPLES, Sample, check_batch, check_mask};

/// Codec identifier carried in `TelemetryUpload::codec`.
pub const CODEC_V1: u8 = 1;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(super) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Writes a column of unsigned values, collapsing runs of zeros.
struct Column<'a> {
    out: &'a mut Vec<u8>,
    zeros: u64,
}

impl<'a> Column<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Column { out, zeros: 0 }
    }
    fn push(&mut self, v: u64) -> Result<(), CodecError> {
        if v == 0 {
            self.zeros += 1;
            return Ok(());
        }
        self.flush();
        if v >= 1 << 63 {
            return Err(CodecError::BadValue);
        }
        put_varint(self.out, v << 1);
        Ok(())
    }
    fn flush(&mut self) {
        if self.zeros > 0 {
            put_varint(self.out, (self.zeros << 1) | 1);
            self.zeros = 0;
        }
    }
}

/// Encodes samples of the registers in `mask` (bit `i` = register `i`).
pub fn encode(mask: u16, samples: &[Sample]) -> Result<Vec<u8>, CodecError> {
    let width = check_batch(mask, samples)?;
    let mut out = Vec::with_capacity(16 + samples.len() * (2 + width));
    out.push(CODEC_V1);
    out.extend_from_slice(&mask.to_be_bytes());
    put_varint(&mut out, samples.len() as u64);
    put_varint(&mut out, samples[0].seq);
    put_varint(&mut out, samples[0].unix_ms);

    let mut col = Column::new(&mut out);
    for w in samples.windows(2) {
        col.push(w[1].seq - w[0].seq - 1)?;
    }
    col.flush();
    let mut col = Column::new(&mut out);
    let mut prev_delta: i64 = 0;
    for w in samples.windows(2) {
        let delta = w[1].unix_ms.wrapping_sub(w[0].unix_ms) as i64;
        col.push(zigzag(delta.wrapping_sub(prev_delta)))?;
        prev_delta = delta;
    }
    col.flush();
    for r in 0..width {
        put_varint(&mut out, u64::from(samples[0].values[r]));
        let mut col = Column::new(&mut out);
        for w in samples.windows(2) {
            col.push(zigzag(i64::from(w[1].values[r]) - i64::from(w[0].values[r])))?;
        }
        col.flush();
    }
    Ok(out)
}

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl Reader<'_> {
    pub(super) fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = *self.bytes.get(self.at).ok_or(CodecError::Truncated)?;
            self.at += 1;
            // Over-long encodings (a last byte of zero) and overflow are refused:
            // every batch has exactly one encoding.
            if (shift == 63 && b > 1) || (shift > 0 && b == 0) {
                return Err(CodecError::BadValue);
            }
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::BadValue)
    }

    /// Reads a column of `n` unsigned values.
    fn column(
        &mut self,
        n: usize,
        mut each: impl FnMut(u64) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let mut done = 0;
        let mut after_run = false;
        while done < n {
            let token = self.varint()?;
            if token & 1 == 1 {
                let run = token >> 1;
                if run == 0 || run > (n - done) as u64 {
                    return Err(CodecError::RunTooLong);
                }
                // Runs are maximal: two in a row have one canonical form, one run.
                if after_run {
                    return Err(CodecError::BadValue);
                }
                after_run = true;
                for _ in 0..run {
                    each(0)?;
                }
                done += run as usize;
            } else {
                let v = token >> 1;
                if v == 0 {
                    // Zeros are always runs: one encoding per batch.
                    return Err(CodecError::BadValue);
                }
                each(v)?;
                done += 1;
                after_run = false;
            }
        }
        Ok(())
    }
}

/// What every version's batch starts with: version, mask, count, the first
/// sample's seq and time (bytes and varints).
pub(super) struct Header {
    pub(super) mask: u16,
    /// Registers in the mask.
    pub(super) width: usize,
    /// Samples, 1..=[`MAX_SAMPLES`] (checked before anything is allocated).
    pub(super) count: usize,
    pub(super) first_seq: u64,
    pub(super) first_ms: u64,
}

/// Reads the header of a batch of `version`, and a reader after it.
pub(super) fn header(bytes: &[u8], version: u8) -> Result<(Header, Reader<'_>), CodecError> {
    let found = *bytes.first().ok_or(CodecError::Truncated)?;
    if found != version {
        return Err(CodecError::UnknownVersion { version: found });
    }
    let mask = u16::from_be_bytes([
        *bytes.get(1).ok_or(CodecError::Truncated)?,
        *bytes.get(2).ok_or(CodecError::Truncated)?,
    ]);
    check_mask(mask)?;
    let mut r = Reader { bytes, at: 3 };
    let count = r.varint()?;
    if count == 0 || count > MAX_SAMPLES as u64 {
        return Err(CodecError::BadCount { count: count.min(usize::MAX as u64) as usize });
    }
    let (first_seq, first_ms) = (r.varint()?, r.varint()?);
    let width = mask.count_ones() as usize;
    Ok((Header { mask, width, count: count as usize, first_seq, first_ms }, r))
}

/// Decodes a batch, checking every bound.
pub fn decode(bytes: &[u8]) -> Result<Batch, CodecError> {
    let (Header { mask, width, count, first_seq, first_ms }, mut r) = header(bytes, CODEC_V1)?;
    let mut samples: Vec<Sample> = Vec::with_capacity(count);
    samples.push(Sample { seq: first_seq, unix_ms: first_ms, values: alloc::vec![0; width] });
    let mut seq = first_seq;
    r.column(count - 1, |gap| {
        seq = seq.checked_add(gap).and_then(|s| s.checked_add(1)).ok_or(CodecError::BadValue)?;
        samples.push(Sample { seq, unix_ms: 0, values: alloc::vec![0; width] });
        Ok(())
    })?;
    let (mut ms, mut delta, mut i) = (first_ms, 0i64, 1);
    r.column(count - 1, |dod| {
        delta = delta.wrapping_add(unzigzag(dod));
        ms = ms.wrapping_add(delta as u64);
        samples[i].unix_ms = ms;
        i += 1;
        Ok(())
    })?;
    for c in 0..width {
        let first = r.varint()?;
        let mut v = i64::try_from(first)
            .ok()
            .filter(|v| *v <= i64::from(u16::MAX))
            .ok_or(CodecError::BadValue)?;
        samples[0].values[c] = v as u16;
        let mut i = 1;
        r.column(count - 1, |d| {
            v += unzigzag(d);
            samples[i].values[c] = u16::try_from(v).map_err(|_| CodecError::BadValue)?;
            i += 1;
            Ok(())
        })?;
    }
    if r.at != bytes.len() {
        return Err(CodecError::TrailingBytes { count: bytes.len() - r.at });
    }
    Ok(Batch { registers: mask, samples })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    use crate::codec::test_samples as samples;

    #[test]
    fn constant_night_costs_almost_nothing() {
        let night = samples(180, |_| vec![2308, 0, 5007, 1642, 1635, 0, 0, 353, 50, 0]);
        let bytes = encode(0x03FF, &night).unwrap();
        assert!(bytes.len() <= 60, "{} bytes for 180 constant samples", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), Batch { registers: 0x03FF, samples: night });
    }

    #[test]
    fn gaps_jitter_and_extremes_round_trip() {
        let mut s = samples(50, |i| {
            vec![(i * 1_000 % 65_536) as u16, u16::MAX - i as u16, (i % 2) as u16 * u16::MAX]
        });
        s[10].seq += 5;
        for x in &mut s[11..] {
            x.seq += 5;
        }
        s[20].unix_ms += 37; // jitter
        s[30].unix_ms -= 2_000_000; // clock step backwards
        let bytes = encode(0b111, &s).unwrap();
        assert_eq!(decode(&bytes).unwrap().samples, s);
    }

    #[test]
    fn bad_input_is_refused() {
        let s = samples(3, |_| vec![1, 2]);
        assert_eq!(encode(0, &s), Err(CodecError::BadMask { mask: 0 }));
        assert_eq!(encode(0b111, &s), Err(CodecError::WidthMismatch { index: 0 }));
        assert_eq!(encode(0b11, &[]), Err(CodecError::BadCount { count: 0 }));
        let mut back = s.clone();
        back[2].seq = back[1].seq;
        assert_eq!(encode(0b11, &back), Err(CodecError::SeqOrder { index: 2 }));
        let bytes = encode(0b11, &s).unwrap();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(CodecError::TrailingBytes { count: 1 }));
        let mut v3 = bytes.clone();
        v3[0] = 3;
        assert_eq!(crate::codec::decode(&v3), Err(CodecError::UnknownVersion { version: 3 }));
    }
}
