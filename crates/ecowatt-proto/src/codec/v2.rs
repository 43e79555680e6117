//! The telemetry batch codec v2: bit-level and per column. Each column (the
//! `seq` gaps, the sample times' residuals from a schedule, every register) is
//! cut into blocks of [`BLOCK`] values, and each block is written with the
//! cheapest of a few models: the values themselves ("level"), their deltas, or
//! their deltas of deltas, each as zigzag offsets from the block's median,
//! bit-packed at one width with the few values that do not fit patched as
//! exceptions. Constant stretches cost a few bits per block, noise costs its
//! width, and a spike costs one or two exceptions instead of widening a block.
//!
//! Times are exact: a batch carries its first time and a period, and each
//! sample its residual from `first + i * period` (the read's jitter), so a
//! device sampling on a schedule spends only the jitter's bits.
//!
//! Lossless for `seq`, times and register values. The encoder keeps a
//! histogram of 65 counters and a few integers besides its output; the decoder
//! two stack arrays of one block. Layout and vectors: `docs/protocol.md`.

use alloc::vec::Vec;

use super::bits::{BitReader, BitWriter, gamma_len};
use super::v1::{Header, header, put_varint, unzigzag, zigzag};
use super::{Batch, CodecError, Sample, check_batch};

/// Codec identifier carried in `TelemetryUpload::codec`.
pub const CODEC_V2: u8 = 2;
/// Values per block of a column.
pub const BLOCK: usize = 64;
/// `seq` must be below this (2^62).
pub const SEQ_LIMIT: u64 = 1 << 62;
/// `unix_ms` must be below this (2^53, year 287,396).
pub const MS_LIMIT: u64 = 1 << 53;
/// Largest time residual the encoder uses a period for.
const RESIDUAL_LIMIT: i128 = 1 << 61;

/// Block models: [`REPEAT`] (every value the one before, no more fields),
/// 0 level, 1 delta, 2 delta of delta. Written as `0` repeat, `10` level,
/// `110` delta, `111` delta of delta.
const REPEAT: u8 = 3;

/// What a column's blocks may use.
#[derive(Debug, Clone, Copy)]
struct Kind {
    /// Models 0..models (0 level, 1 delta, 2 delta of delta), besides [`REPEAT`].
    models: u8,
    /// Widest packed value, bits.
    max_width: u32,
    /// Bits of a width field.
    width_bits: u32,
}

/// A register column: u16 values, deltas of deltas within ±2^17.
const REGISTER: Kind = Kind { models: 3, max_width: 20, width_bits: 5 };
/// The `seq` gaps and time residuals: 62-bit values, level or delta.
const SERIES: Kind = Kind { models: 2, max_width: 64, width_bits: 7 };

/// Bits of model `m`'s code.
fn model_bits(m: u8) -> u32 {
    match m {
        REPEAT => 1,
        0 => 2,
        _ => 3,
    }
}

fn put_model(w: &mut BitWriter<'_>, m: u8) {
    match m {
        REPEAT => w.put(0, 1),
        0 => w.put(0b10, 2),
        1 => w.put(0b110, 3),
        _ => w.put(0b111, 3),
    }
}

fn get_model(r: &mut BitReader<'_>) -> Result<u8, CodecError> {
    if r.get(1)? == 0 {
        return Ok(REPEAT);
    }
    if r.get(1)? == 0 {
        return Ok(0);
    }
    Ok(1 + r.get(1)? as u8)
}

/// Writes a first value: its bit length in 5 bits, then the bits below its
/// leading one (0 is length 0).
fn put_first(w: &mut BitWriter<'_>, v: u16) {
    let len = bit_len(u64::from(v));
    w.put(u64::from(len), 5);
    if len > 1 {
        w.put(u64::from(v), len - 1);
    }
}

fn get_first(r: &mut BitReader<'_>) -> Result<u16, CodecError> {
    let len = r.get(5)? as u32;
    match len {
        0 => Ok(0),
        1..=16 => Ok(((1u64 << (len - 1)) | r.get(len - 1)?) as u16),
        _ => Err(CodecError::BadWidth { width: len as u8 }),
    }
}

/// Bits of `u` Rice-coded with parameter `k` (see [`put_rice`]).
fn rice_len(u: u64, k: u32, max_width: u32) -> u64 {
    let q = if k >= 64 { 0 } else { u >> k };
    if q >= ESCAPE { ESCAPE + u64::from(max_width) } else { q + 1 + u64::from(k) }
}

/// `u >> k` in unary (ones, then a zero) and the low `k` bits, or [`ESCAPE`]
/// ones and `u` in `max_width` bits when the quotient is that large.
fn put_rice(w: &mut BitWriter<'_>, u: u64, k: u32, max_width: u32) {
    let q = if k >= 64 { 0 } else { u >> k };
    if q >= ESCAPE {
        w.put(mask(ESCAPE as u32), ESCAPE as u32);
        w.put(u, max_width);
    } else {
        w.put(mask(q as u32 + 1) - 1, q as u32 + 1);
        w.put(u, k);
    }
}

fn get_rice(r: &mut BitReader<'_>, k: u32, max_width: u32) -> Result<u64, CodecError> {
    let mut q = 0;
    while q < ESCAPE && r.get(1)? == 1 {
        q += 1;
    }
    if q == ESCAPE {
        return r.get(max_width);
    }
    let high = q.checked_shl(k).filter(|h| h >> k == q).ok_or(CodecError::BadValue)?;
    Ok(high | r.get(k)?)
}

fn bit_len(v: u64) -> u32 {
    64 - v.leading_zeros()
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 }
}

/// The value model `model` codes at index `i` (≥ 1) of base sequence `b`.
fn transformed(model: u8, b: &impl Fn(usize) -> i64, i: usize) -> i64 {
    match model {
        0 => b(i),
        1 => b(i) - b(i - 1),
        // b[-1] is taken as b[0]: the delta before the first one is 0.
        _ => b(i) - 2 * b(i - 1) + b(i.saturating_sub(2)),
    }
}

/// A Rice-coded value whose quotient reaches this is escaped: this many
/// ones, then the value in the column's widest width.
const ESCAPE: u64 = 16;

/// How one block is written.
#[derive(Debug, Clone, Copy)]
struct Plan {
    model: u8,
    /// Zigzag of `center - reference`.
    center_code: u64,
    /// Rice-coded with parameter `width` instead of bit-packed.
    rice: bool,
    width: u32,
    exceptions: u32,
    high_width: u32,
    bits: u64,
}

/// One block's zigzag offsets from its center under one model, on the stack.
type Offsets = [u64; BLOCK];

/// Chooses how to write one block whose values under `model` are `x`
/// (`reference`: what the center of a level block is coded against), and
/// leaves the values' offsets from the chosen center in `u`.
fn plan(kind: Kind, model: u8, x: &[i64], reference: i64, u: &mut Offsets) -> Plan {
    let len = x.len();
    // The lower median as the center: a spike does not move it.
    let mut sorted = [0i64; BLOCK];
    sorted[..len].copy_from_slice(x);
    sorted[..len].sort_unstable();
    let center = sorted[(len - 1) / 2];
    let center_code = zigzag(center.wrapping_sub(reference));
    let mut hist = [0u16; 65];
    let mut sum = 0u128;
    for (u, &x) in u.iter_mut().zip(x) {
        *u = zigzag(x.wrapping_sub(center));
        hist[bit_len(*u) as usize] += 1;
        sum += u128::from(*u);
    }
    let u = &u[..len];
    let longest = (0..65).rev().find(|&l| hist[l] > 0).unwrap_or(0) as u32;
    let len = len as u64;
    let pos_bits = u64::from(bit_len(len - 1));
    let fixed = u64::from(model_bits(model) + gamma_len(center_code) + 1 + kind.width_bits);
    let mut best = Plan {
        model,
        center_code,
        rice: false,
        width: 0,
        exceptions: 0,
        high_width: 0,
        bits: u64::MAX,
    };
    // Rice codes near k = log2(mean), the usual optimum.
    let around = bit_len(u64::try_from(sum / u128::from(len)).unwrap_or(u64::MAX));
    for k in around.saturating_sub(2)..=(around + 1).min(kind.max_width - 1) {
        let bits = fixed + u.iter().map(|&v| rice_len(v, k, kind.max_width)).sum::<u64>();
        if bits < best.bits {
            best = Plan { rice: true, width: k, bits, ..best };
        }
    }
    // Bit-packed at each width, what does not fit patched.
    let mut wider = 0u32;
    for width in (0..=longest).rev() {
        if width < longest {
            wider += u32::from(hist[width as usize + 1]);
        }
        let high_width = longest - width;
        let mut bits = fixed + len * u64::from(width) + u64::from(gamma_len(u64::from(wider)));
        if wider > 0 {
            bits +=
                u64::from(kind.width_bits) + u64::from(wider) * (pos_bits + u64::from(high_width));
        }
        if bits < best.bits || (!best.rice && bits == best.bits) {
            best = Plan { rice: false, width, exceptions: wider, high_width, bits, ..best };
        }
    }
    best
}

/// The cheapest way to write `b[start..end]`, and its offsets in `u`.
fn best_plan(
    kind: Kind,
    b: &impl Fn(usize) -> i64,
    start: usize,
    end: usize,
    u: &mut Offsets,
) -> Plan {
    let repeat = Plan {
        model: REPEAT,
        center_code: 0,
        rice: false,
        width: 0,
        exceptions: 0,
        high_width: 0,
        bits: u64::from(model_bits(REPEAT)),
    };
    if (start..end).all(|i| b(i) == b(i - 1)) {
        return repeat;
    }
    let mut best = Plan { bits: u64::MAX, ..repeat };
    let mut x = [0i64; BLOCK];
    let mut trial = [0u64; BLOCK];
    for model in 0..kind.models {
        for (k, i) in (start..end).enumerate() {
            x[k] = transformed(model, b, i);
        }
        let reference = if model == 0 { b(start - 1) } else { 0 };
        let p = plan(kind, model, &x[..end - start], reference, &mut trial);
        if p.bits < best.bits {
            best = p;
            u.copy_from_slice(&trial);
        }
    }
    best
}

/// Bits the column `b[1..n]` costs.
fn column_bits(kind: Kind, b: &impl Fn(usize) -> i64, n: usize) -> u64 {
    let mut u = [0u64; BLOCK];
    (1..n).step_by(BLOCK).map(|s| best_plan(kind, b, s, (s + BLOCK).min(n), &mut u).bits).sum()
}

/// Writes `b[1..n]` (`b[0]` is known to the decoder).
fn put_column(w: &mut BitWriter<'_>, kind: Kind, b: &impl Fn(usize) -> i64, n: usize) {
    let mut u = [0u64; BLOCK];
    for start in (1..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let p = best_plan(kind, b, start, end, &mut u);
        let u = &u[..end - start];
        put_model(w, p.model);
        if p.model == REPEAT {
            continue;
        }
        w.gamma(p.center_code);
        w.put(u64::from(p.rice), 1);
        w.put(u64::from(p.width), kind.width_bits);
        if p.rice {
            for &v in u {
                put_rice(w, v, p.width, kind.max_width);
            }
            continue;
        }
        w.gamma(u64::from(p.exceptions));
        let fits = mask(p.width);
        if p.exceptions > 0 {
            w.put(u64::from(p.high_width), kind.width_bits);
            let pos_bits = bit_len((u.len() - 1) as u64);
            for (k, _) in u.iter().enumerate().filter(|(_, v)| **v > fits) {
                w.put(k as u64, pos_bits);
            }
        }
        for &v in u {
            w.put(v, p.width);
        }
        for &v in u.iter().filter(|v| **v > fits) {
            w.put(v >> p.width, p.high_width);
        }
    }
}

/// The time residuals' base sequence under `period`, if every residual is small enough.
fn residuals(samples: &[Sample], period: i64) -> Option<impl Fn(usize) -> i64 + '_> {
    let first = i128::from(samples[0].unix_ms);
    let r = move |i: usize| i128::from(samples[i].unix_ms) - first - i128::from(period) * i as i128;
    (0..samples.len()).all(|i| r(i).abs() < RESIDUAL_LIMIT).then_some(move |i: usize| r(i) as i64)
}

/// Encodes samples of the registers in `mask` (bit `i` = register `i`).
pub fn encode(mask: u16, samples: &[Sample]) -> Result<Vec<u8>, CodecError> {
    let width = check_batch(mask, samples)?;
    if samples.iter().any(|s| s.seq >= SEQ_LIMIT || s.unix_ms >= MS_LIMIT) {
        return Err(CodecError::BadValue);
    }
    let n = samples.len();
    // The period: the median step or the mean one, whichever costs less.
    let step = |i: usize| samples[i].unix_ms as i64 - samples[i - 1].unix_ms as i64;
    let period = if n < 2 {
        0
    } else {
        let median_step = {
            // The median of the first block's steps (bounded memory for any batch).
            let mut steps = [0i64; BLOCK];
            let m = (n - 1).min(BLOCK);
            for (k, s) in steps[..m].iter_mut().enumerate() {
                *s = step(k + 1);
            }
            steps[..m].sort_unstable();
            steps[(m - 1) / 2]
        };
        let span = samples[n - 1].unix_ms as i64 - samples[0].unix_ms as i64;
        let mean_step = span.div_euclid(n as i64 - 1);
        [median_step, mean_step, mean_step + 1, 0]
            .into_iter()
            .filter(|p| p.unsigned_abs() < MS_LIMIT)
            .filter_map(|p| residuals(samples, p).map(|r| (column_bits(SERIES, &r, n), p)))
            .min_by_key(|(bits, _)| *bits)
            .map_or(0, |(_, p)| p)
    };
    let mut out = Vec::with_capacity(24 + n * (1 + width));
    out.push(CODEC_V2);
    out.extend_from_slice(&mask.to_be_bytes());
    put_varint(&mut out, n as u64);
    put_varint(&mut out, samples[0].seq);
    put_varint(&mut out, samples[0].unix_ms);
    put_varint(&mut out, zigzag(period));
    let mut w = BitWriter::new(&mut out);
    let gaps = |i: usize| if i == 0 { 0 } else { (samples[i].seq - samples[i - 1].seq - 1) as i64 };
    put_column(&mut w, SERIES, &gaps, n);
    let times = residuals(samples, period).expect("the period was checked");
    put_column(&mut w, SERIES, &times, n);
    for r in 0..width {
        put_first(&mut w, samples[0].values[r]);
        put_column(&mut w, REGISTER, &|i: usize| i64::from(samples[i].values[r]), n);
    }
    w.finish();
    Ok(out)
}

/// Reads a bit-packed block of `u.len()` values at `width` bits with its patched exceptions.
fn get_packed(
    r: &mut BitReader<'_>,
    kind: Kind,
    width: u32,
    u: &mut [u64],
) -> Result<(), CodecError> {
    let len = u.len();
    let exceptions = r.gamma()?;
    if exceptions > len as u64 {
        return Err(CodecError::BadExceptions);
    }
    let exceptions = exceptions as usize;
    let mut at = [0u8; BLOCK];
    let mut high_width = 0;
    if exceptions > 0 {
        high_width = r.get(kind.width_bits)? as u32;
        if high_width == 0 || width + high_width > kind.max_width {
            return Err(CodecError::BadWidth { width: (width + high_width) as u8 });
        }
        let pos_bits = bit_len(len as u64 - 1);
        for k in 0..exceptions {
            let p = r.get(pos_bits)?;
            if p >= len as u64 || (k > 0 && p <= u64::from(at[k - 1])) {
                return Err(CodecError::BadExceptions);
            }
            at[k] = p as u8;
        }
    }
    for v in u.iter_mut() {
        *v = r.get(width)?;
    }
    for &p in &at[..exceptions] {
        let high = r.get(high_width)?;
        if high == 0 {
            return Err(CodecError::BadExceptions);
        }
        u[p as usize] |= high << width;
    }
    Ok(())
}

/// Reads `n - 1` values of a column whose `b[0]` is `first`, handing each
/// `b[i]` to `each(i, b)`.
fn get_column(
    r: &mut BitReader<'_>,
    kind: Kind,
    first: i64,
    n: usize,
    mut each: impl FnMut(usize, i64) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let (mut prev, mut prev2) = (first, first);
    let mut start = 1;
    while start < n {
        let len = BLOCK.min(n - start);
        let model = get_model(r)?;
        if model == REPEAT {
            for i in start..start + len {
                each(i, prev)?;
            }
            prev2 = prev;
            start += len;
            continue;
        }
        if model >= kind.models {
            return Err(CodecError::BadModel { model });
        }
        let reference = if model == 0 { prev } else { 0 };
        let center = reference.checked_add(unzigzag(r.gamma()?)).ok_or(CodecError::BadValue)?;
        let rice = r.get(1)? == 1;
        let width = r.get(kind.width_bits)? as u32;
        if width > kind.max_width || (rice && width == kind.max_width) {
            return Err(CodecError::BadWidth { width: width as u8 });
        }
        let mut u = [0u64; BLOCK];
        if rice {
            for v in u.iter_mut().take(len) {
                *v = get_rice(r, width, kind.max_width)?;
            }
        } else {
            get_packed(r, kind, width, &mut u[..len])?;
        }
        for (k, &v) in u[..len].iter().enumerate() {
            let x = center.checked_add(unzigzag(v)).ok_or(CodecError::BadValue)?;
            let b = match model {
                0 => Some(x),
                1 => prev.checked_add(x),
                _ => prev
                    .checked_mul(2)
                    .and_then(|d| d.checked_sub(prev2))
                    .and_then(|d| d.checked_add(x)),
            }
            .ok_or(CodecError::BadValue)?;
            each(start + k, b)?;
            (prev2, prev) = (prev, b);
        }
        start += len;
    }
    Ok(())
}

/// Decodes a v2 batch, checking every bound before allocating for it.
pub fn decode(bytes: &[u8]) -> Result<Batch, CodecError> {
    let (Header { mask, width, count: n, first_seq, first_ms }, mut h) = header(bytes, CODEC_V2)?;
    let period = unzigzag(h.varint()?);
    if first_seq >= SEQ_LIMIT || first_ms >= MS_LIMIT || period.unsigned_abs() >= MS_LIMIT {
        return Err(CodecError::BadValue);
    }
    let mut r = BitReader::new(&bytes[h.at..]);
    let mut samples: Vec<Sample> = Vec::with_capacity(n);
    samples.push(Sample { seq: first_seq, unix_ms: first_ms, values: alloc::vec![0; width] });
    let mut seq = first_seq;
    get_column(&mut r, SERIES, 0, n, |_, gap| {
        let gap = u64::try_from(gap).map_err(|_| CodecError::BadValue)?;
        seq = seq
            .checked_add(gap)
            .and_then(|s| s.checked_add(1))
            .filter(|s| *s < SEQ_LIMIT)
            .ok_or(CodecError::BadValue)?;
        samples.push(Sample { seq, unix_ms: 0, values: alloc::vec![0; width] });
        Ok(())
    })?;
    get_column(&mut r, SERIES, 0, n, |i, residual| {
        let ms = i128::from(first_ms) + i128::from(period) * i as i128 + i128::from(residual);
        if !(0..i128::from(MS_LIMIT)).contains(&ms) {
            return Err(CodecError::BadValue);
        }
        samples[i].unix_ms = ms as u64;
        Ok(())
    })?;
    for c in 0..width {
        let first = get_first(&mut r)?;
        samples[0].values[c] = first;
        get_column(&mut r, REGISTER, i64::from(first), n, |i, v| {
            samples[i].values[c] = u16::try_from(v).map_err(|_| CodecError::BadValue)?;
            Ok(())
        })?;
    }
    r.finish()?;
    Ok(Batch { registers: mask, samples })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    use crate::codec::test_samples as samples;

    fn round_trip(mask: u16, s: &[Sample]) -> usize {
        let bytes = encode(mask, s).unwrap();
        assert_eq!(decode(&bytes).unwrap(), Batch { registers: mask, samples: s.to_vec() });
        bytes.len()
    }

    #[test]
    fn constant_night_costs_a_few_bits_per_block() {
        let night = samples(180, |_| vec![2308, 0, 5007, 1642, 1635, 0, 0, 353, 50, 0]);
        let len = round_trip(0x03FF, &night);
        assert!(len <= 40, "{len} bytes for 180 constant samples");
    }

    #[test]
    fn noise_costs_its_width_and_a_spike_one_exception() {
        // Frequency noise of ±2 around 50.00 Hz, one 0xFFFF read.
        let mut s = samples(60, |i| vec![(5000 + (i * 7 % 5) - 2) as u16]);
        let quiet = round_trip(0x0004, &s);
        s[30].values[0] = 0xFFFF;
        let spiked = round_trip(0x0004, &s);
        assert!(quiet <= 13 + 59 * 3 / 8 + 6, "{quiet} bytes");
        assert!(spiked <= quiet + 5, "a spike costs {} bytes", spiked - quiet);
    }

    #[test]
    fn jitter_gaps_and_extremes_round_trip() {
        let mut s = samples(300, |i| {
            vec![(i * 1_000 % 65_536) as u16, u16::MAX - i as u16, (i % 2) as u16 * u16::MAX]
        });
        for (i, x) in s.iter_mut().enumerate() {
            x.unix_ms += (i as u64 * 37) % 90; // read jitter
        }
        for x in &mut s[10..] {
            x.seq += 5;
        }
        s[20].unix_ms += 60_000; // a late read
        s[30].unix_ms -= 2_000_000; // clock step backwards
        round_trip(0b111, &s);
        round_trip(0b111, &s[..1]);
        round_trip(0b111, &s[..2]);
        let far = [
            Sample { seq: 0, unix_ms: 0, values: vec![0] },
            Sample { seq: SEQ_LIMIT - 1, unix_ms: MS_LIMIT - 1, values: vec![u16::MAX] },
            Sample { seq: SEQ_LIMIT - 1, unix_ms: 0, values: vec![0] },
        ];
        round_trip(0b1, &far[..2]);
        // The widest step there is: 2^53 - 1 (a period is below 2^53 for the decoder).
        let wide = [
            Sample { seq: 1, unix_ms: 0, values: vec![0] },
            Sample { seq: 2, unix_ms: MS_LIMIT - 1, values: vec![0] },
        ];
        round_trip(0b1, &wide);
        assert_eq!(encode(0b1, &far[..3]), Err(CodecError::SeqOrder { index: 2 }));
        let over = [Sample { seq: SEQ_LIMIT, unix_ms: 0, values: vec![0] }];
        assert_eq!(encode(0b1, &over), Err(CodecError::BadValue));
    }

    #[test]
    fn impossible_claims_are_refused() {
        let s = samples(70, |i| vec![(i * 3) as u16, 7]);
        let bytes = encode(0b11, &s).unwrap();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(CodecError::TrailingBytes { count: 1 }));
        // A count beyond the limit is refused before anything is allocated for it.
        let mut huge = vec![CODEC_V2, 0, 1];
        put_varint(&mut huge, 1 << 40);
        assert!(matches!(decode(&huge), Err(CodecError::BadCount { .. })));
        // One sample, first register value and a bad padding bit.
        let one = encode(
            0b1,
            &s[..1]
                .iter()
                .map(|x| Sample { values: vec![x.values[0]], ..x.clone() })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut padded = one.clone();
        padded.push(0x01);
        assert!(decode(&padded).is_err());
        // Block headers: model 3, width beyond the column, exceptions beyond the block.
        let header = |seq: &[(u64, u32)], register: &[(u64, u32)]| {
            let mut out = vec![CODEC_V2, 0, 1];
            put_varint(&mut out, 2); // two samples
            put_varint(&mut out, 1);
            put_varint(&mut out, 1_000);
            put_varint(&mut out, zigzag(5_000));
            let mut w = BitWriter::new(&mut out);
            for &(v, n) in seq {
                w.put(v, n);
            }
            w.put(0, 1); // times: repeat
            put_first(&mut w, 2308);
            for &(v, n) in register {
                w.put(v, n);
            }
            w.finish();
            out
        };
        // Level, center +1 (gamma of zigzag 2 = 011), packed, width 0, no exceptions.
        let level = [(0b10, 2), (0b011, 3), (0, 1), (0, 5), (1, 1)];
        let fine = header(&[(0, 1)], &level);
        assert_eq!(decode(&fine).unwrap().samples[1].values, vec![2309]);
        assert_eq!(decode(&header(&[(0b111, 3)], &level)), Err(CodecError::BadModel { model: 2 }));
        let wide = [(0b10, 2), (1, 1), (0, 1), (21, 5), (1, 1)];
        assert_eq!(decode(&header(&[(0, 1)], &wide)), Err(CodecError::BadWidth { width: 21 }));
        // gamma(2) = 011: two exceptions in a block of one value.
        let many = [(0b10, 2), (1, 1), (0, 1), (0, 5), (0b011, 3)];
        assert_eq!(decode(&header(&[(0, 1)], &many)), Err(CodecError::BadExceptions));
        // A level centred at -1 (2308 + unzigzag(4617)): no register holds it.
        let negative = [(0b10, 2), (0, 12), (4618, 13), (0, 1), (0, 5), (1, 1)];
        assert_eq!(decode(&header(&[(0, 1)], &negative)), Err(CodecError::BadValue));
        let zero = [(0b10, 2), (0, 12), (4616, 13), (0, 1), (0, 5), (1, 1)];
        assert_eq!(decode(&header(&[(0, 1)], &zero)).unwrap().samples[1].values, vec![0]);
    }
}
