//! The original firmware's compressed batches (`compressed_binary`, one per
//! batch of samples, values sample by sample, register ids as its `RegID`:
//! EcoWatt's register addresses). Its encoder chose per batch the smallest
//! of four methods; each is decoded here exactly or not at all, because
//! the encoder itself loses information in some cases (docs/migration.md):
//!
//! | marker | method | decoded |
//! |---|---|---|
//! | `0x00` | raw, little-endian | always |
//! | `0x01` | bit-packed, MSB first | unless a value spans three bytes (the encoder corrupts those) |
//! | `0x70` | temporal base: layout and raw values | always |
//! | `0x71` | temporal delta from `2·prev − prev2` | when the two batches before it were decoded |
//! | `0xD0` | dictionary pattern + deltas | when every delta byte is unambiguous and every position is known |
//! | `0x50` | semantic run-length | never: it merges values within a tolerance |
//!
//! Decoding keeps the state the device keeps ([`DecoderState`]): its last
//! two batches' values (for `0x71`) and the patterns its dictionary learned
//! (for `0xD0` indexes above 3), reset when the device restarts.

use serde::{Deserialize, Serialize};

/// The dictionary every original device starts with (indexes 0..=3),
/// by register id.
pub const DICTIONARY: [[u16; 10]; 4] = [
    [2400, 170, 50, 400, 380, 70, 65, 550, 4000, 4200],
    [2380, 100, 50, 200, 180, 30, 25, 520, 2000, 2500],
    [2450, 200, 50, 450, 420, 90, 85, 580, 5000, 5200],
    [2430, 165, 50, 350, 350, 70, 65, 545, 4100, 4150],
];
/// The most patterns the device's dictionary holds.
const DICTIONARY_MAX: usize = 15;
/// Average distance under which a batch matches a pattern.
const MATCH_AVG: u32 = 200;

/// What the device knows when it encodes a batch, as far as the server can
/// follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderState {
    /// The device's clock (`millis()`) at its last batch: a smaller one
    /// means it restarted, and with it its encoder state.
    pub last_millis: Option<u64>,
    /// The final value of each register in the last batch, then in the
    /// one before (newest first; `None`: not known exactly).
    pub recent: Vec<[Option<u16>; 10]>,
    /// Patterns learned beyond the first four, by register id.
    pub learned: Vec<[u16; 10]>,
    /// Whether `learned` is what the device holds (false once a batch the
    /// server could not decode may have taught it one).
    pub learned_known: bool,
}

impl Default for DecoderState {
    fn default() -> Self {
        DecoderState {
            last_millis: None,
            recent: Vec::new(),
            learned: Vec::new(),
            learned_known: true,
        }
    }
}

/// Why a batch was not decoded (each with a stable reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    /// The bytes end early or carry more than the firmware's padding.
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    /// An unknown method marker (or a headerless packet of under 9 values).
    #[error("unknown method 0x{0:02x}")]
    Unknown(u8),
    /// The original encoder lost information in this batch.
    #[error("the original encoder lost information: {0}")]
    Lossy(&'static str),
    /// It depends on earlier batches the server could not decode.
    #[error("it depends on earlier batches not decoded: {0}")]
    NeedsState(&'static str),
    /// Register ids outside 0..=9, repeated, or a count the layout does not divide.
    #[error("bad register layout: {0}")]
    Layout(&'static str),
}

impl Undecodable {
    /// The stable reason, for counters and answers.
    pub fn reason(&self) -> &'static str {
        match self {
            Undecodable::Malformed(_) => "malformed",
            Undecodable::Unknown(_) => "unknown_method",
            Undecodable::Lossy(_) => "lossy",
            Undecodable::NeedsState(_) => "needs_state",
            Undecodable::Layout(_) => "layout",
        }
    }
}

/// A decoded batch: samples of the registers in `mask`, values in address order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Register mask (bit `i`: register `i`).
    pub mask: u16,
    /// Samples, oldest first.
    pub samples: Vec<Vec<u16>>,
}

/// Reads `n` bytes at `at`, or fails as malformed `what`.
fn take<'a>(b: &'a [u8], at: usize, n: usize, what: &'static str) -> Result<&'a [u8], Undecodable> {
    b.get(at..at + n).ok_or(Undecodable::Malformed(what))
}

/// The packet ends at `end`: at most two zero bytes may follow (the
/// firmware's Base64 encoder pads with encoded zeros instead of `=`).
fn ends_at(b: &[u8], end: usize, what: &'static str) -> Result<(), Undecodable> {
    match b.get(end..) {
        Some(rest) if rest.len() <= 2 && rest.iter().all(|&x| x == 0) => Ok(()),
        _ => Err(Undecodable::Malformed(what)),
    }
}

fn le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// Decodes one packet. `layout` is the register ids of one sample (the
/// packet's `register_layout`), `millis` its `timestamp`. `state` follows
/// the device: updated whether or not the packet decodes.
pub fn decode(
    bytes: &[u8],
    layout: &[u8],
    millis: Option<u64>,
    state: &mut DecoderState,
) -> Result<Batch, Undecodable> {
    if let (Some(now), Some(last)) = (millis, state.last_millis) {
        if now < last {
            *state = DecoderState::default();
        }
    }
    state.last_millis = millis.or(state.last_millis);
    let decoded = values(bytes, layout, state);
    match &decoded {
        Ok((values, selection)) => learn(state, values, selection),
        Err(_) => {
            // The device updated its state from values the server does not have.
            state.recent.clear();
            if state.learned.len() + DICTIONARY.len() < DICTIONARY_MAX {
                state.learned_known = false;
            }
        }
    }
    let (values, selection) = decoded?;
    batch(&values, &selection, layout)
}

/// The values of a packet and each one's register id.
fn values(
    bytes: &[u8],
    layout: &[u8],
    state: &DecoderState,
) -> Result<(Vec<u16>, Vec<u8>), Undecodable> {
    let marker = *bytes.first().ok_or(Undecodable::Malformed("empty"))?;
    let count = usize::from(*bytes.get(1).ok_or(Undecodable::Malformed("short"))?);
    let per_layout = |count: usize| -> Result<Vec<u8>, Undecodable> {
        if layout.is_empty() || count == 0 || count % layout.len() != 0 {
            return Err(Undecodable::Layout("the count is not a whole number of samples"));
        }
        Ok(layout.iter().copied().cycle().take(count).collect())
    };
    match marker {
        0x00 => {
            let data = take(bytes, 2, 2 * count, "raw")?;
            ends_at(bytes, 2 + 2 * count, "raw")?;
            Ok((data.chunks(2).map(le).collect(), per_layout(count)?))
        }
        0x01 => {
            let bits = usize::from(*bytes.get(1).ok_or(Undecodable::Malformed("bit-packed"))?);
            let count = usize::from(*bytes.get(2).ok_or(Undecodable::Malformed("bit-packed"))?);
            if !(1..=16).contains(&bits) {
                return Err(Undecodable::Malformed("bit-packed"));
            }
            let len = (count * bits).div_ceil(8);
            let data = take(bytes, 3, len, "bit-packed")?;
            ends_at(bytes, 3 + len, "bit-packed")?;
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let at = i * bits;
                if at % 8 + bits > 16 {
                    return Err(Undecodable::Lossy("a bit-packed value spans three bytes"));
                }
                let byte = at / 8;
                let two = u32::from(data[byte]) << 8 | u32::from(*data.get(byte + 1).unwrap_or(&0));
                let shift = 16 - at % 8 - bits;
                out.push(((two >> shift) & ((1 << bits) - 1)) as u16);
            }
            Ok((out, per_layout(count)?))
        }
        0x70 => {
            let selection = take(bytes, 2, count, "temporal base")?.to_vec();
            let data = take(bytes, 2 + count, 2 * count, "temporal base")?;
            ends_at(bytes, 2 + 3 * count, "temporal base")?;
            Ok((data.chunks(2).map(le).collect(), selection))
        }
        0x71 => {
            let selection = per_layout(count)?;
            let (Some(prev1), Some(prev2)) = (state.recent.first(), state.recent.get(1)) else {
                return Err(Undecodable::NeedsState(
                    "a temporal delta follows batches not decoded",
                ));
            };
            let mut at = 2;
            let mut out = Vec::with_capacity(count);
            for &reg in &selection {
                let b = *bytes.get(at).ok_or(Undecodable::Malformed("temporal delta"))?;
                let delta: i32 = match b {
                    _ if b & 0x80 != 0 => {
                        at += 1;
                        let m = i32::from(b & 0x3F);
                        if b & 0x40 != 0 { -m } else { m }
                    }
                    0x00 => {
                        at += 2;
                        i32::from(
                            *bytes.get(at - 1).ok_or(Undecodable::Malformed("temporal delta"))?
                                as i8,
                        )
                    }
                    0x01 => {
                        at += 3;
                        i32::from(le(take(bytes, at - 2, 2, "temporal delta")?) as i16)
                    }
                    _ => return Err(Undecodable::Malformed("temporal delta")),
                };
                let r = usize::from(reg);
                let (Some(p1), Some(p2)) =
                    (prev1.get(r).copied().flatten(), prev2.get(r).copied().flatten())
                else {
                    return Err(Undecodable::NeedsState(
                        "a register's earlier values are not known",
                    ));
                };
                let mut predicted = 2 * i32::from(p1) - i32::from(p2);
                if !(0..=65535).contains(&predicted) {
                    predicted = i32::from(p1);
                }
                out.push((predicted + delta).rem_euclid(65536) as u16);
            }
            ends_at(bytes, at, "temporal delta")?;
            Ok((out, selection))
        }
        0xD0 => dictionary(bytes, &per_layout_d(bytes, layout)?, state),
        0x50 => Err(Undecodable::Lossy("semantic run-length merges values within a tolerance")),
        other => Err(Undecodable::Unknown(other)),
    }
}

/// The selection of a dictionary packet (its count is its third byte).
fn per_layout_d(bytes: &[u8], layout: &[u8]) -> Result<Vec<u8>, Undecodable> {
    let count = usize::from(*bytes.get(2).ok_or(Undecodable::Malformed("dictionary"))?);
    if layout.is_empty() || count == 0 || count % layout.len() != 0 {
        return Err(Undecodable::Layout("the count is not a whole number of samples"));
    }
    Ok(layout.iter().copied().cycle().take(count).collect())
}

fn dictionary(
    bytes: &[u8],
    selection: &[u8],
    state: &DecoderState,
) -> Result<(Vec<u16>, Vec<u8>), Undecodable> {
    let index = usize::from(bytes[1]);
    let count = selection.len();
    let mask = le(take(bytes, 3, 2, "dictionary")?);
    let pattern = match DICTIONARY.get(index) {
        Some(p) => *p,
        None if state.learned_known => *state
            .learned
            .get(index - DICTIONARY.len())
            .ok_or(Undecodable::Malformed("dictionary"))?,
        None => return Err(Undecodable::NeedsState("a learned pattern is not known")),
    };
    let mut deltas = Vec::new();
    let mut at = 5;
    while at < bytes.len() {
        let (b, rest) = (bytes[at], bytes.len() - at);
        if b & 0x80 != 0 {
            if b & 0x40 != 0 {
                return Err(Undecodable::Lossy(
                    "a one-byte dictionary delta of 64 or more, or negative, is ambiguous",
                ));
            }
            deltas.push(i32::from(b & 0x3F));
            at += 1;
        } else if b == 0 && rest >= 3 {
            deltas.push(i32::from(le(&bytes[at + 1..at + 3]) as i16));
            at += 3;
        } else if rest <= 2 && bytes[at..].iter().all(|&x| x == 0) {
            break;
        } else {
            return Err(Undecodable::Malformed("dictionary"));
        }
    }
    // Positions: the mask names them when there are at most 16 values (the
    // encoder's mask has 16 bits and, past them, aliases); past that only a
    // delta at every position leaves no doubt.
    let positions: Vec<usize> = if count <= 16 {
        (0..count).filter(|i| mask & (1 << i) != 0).collect()
    } else if deltas.len() == count {
        (0..count).collect()
    } else {
        return Err(Undecodable::Lossy("more than 16 values and not every one has a delta"));
    };
    if positions.len() != deltas.len() {
        return Err(Undecodable::Malformed("dictionary"));
    }
    let mut out: Vec<i32> =
        selection.iter().map(|&r| i32::from(*pattern.get(usize::from(r)).unwrap_or(&0))).collect();
    for (p, d) in positions.into_iter().zip(deltas) {
        out[p] += d;
    }
    Ok((out.into_iter().map(|v| v.rem_euclid(65536) as u16).collect(), selection.to_vec()))
}

/// Follows the device's state after a batch it encoded from `values`.
fn learn(state: &mut DecoderState, values: &[u16], selection: &[u8]) {
    let mut last = [None; 10];
    for (&v, &r) in values.iter().zip(selection) {
        if let Some(slot) = last.get_mut(usize::from(r)) {
            *slot = Some(v);
        }
    }
    state.recent.insert(0, last);
    state.recent.truncate(2);
    if !state.learned_known || DICTIONARY.len() + state.learned.len() >= DICTIONARY_MAX {
        return;
    }
    let distance = |p: &[u16; 10]| -> u32 {
        values
            .iter()
            .zip(selection)
            .map(|(&v, &r)| {
                (i32::from(v) - i32::from(*p.get(usize::from(r)).unwrap_or(&0))).unsigned_abs()
            })
            .sum()
    };
    let best = DICTIONARY.iter().chain(&state.learned).map(distance).min().unwrap_or(u32::MAX);
    if best / values.len().max(1) as u32 >= MATCH_AVG {
        let mut p = [0u16; 10];
        for (&v, &r) in values.iter().zip(selection) {
            if let Some(slot) = p.get_mut(usize::from(r)) {
                *slot = v;
            }
        }
        state.learned.push(p);
    }
}

/// Values in the device's order as samples of a register mask.
fn batch(values: &[u16], selection: &[u8], layout: &[u8]) -> Result<Batch, Undecodable> {
    let width = if layout.is_empty() { selection.len() } else { layout.len() };
    let sample_layout = &selection[..width.min(selection.len())];
    if width == 0
        || values.len() % width != 0
        || selection.chunks(width).any(|c| c != sample_layout)
    {
        return Err(Undecodable::Layout("samples do not share one register layout"));
    }
    let mut mask = 0u16;
    for &r in sample_layout {
        if r > 9 || mask & (1 << r) != 0 {
            return Err(Undecodable::Layout("register ids must be distinct and within 0..=9"));
        }
        mask |= 1 << r;
    }
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by_key(|&i| sample_layout[i]);
    let samples = values.chunks(width).map(|s| order.iter().map(|&i| s[i]).collect()).collect();
    Ok(Batch { mask, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: [u8; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

    fn sample(k: u16) -> Vec<u16> {
        vec![2430 + k, 170 + k, 50, 400 + k, 380, 70, 65, 550 + k, 60, 4100 + k]
    }

    /// `0x70`: count, layout per value, little-endian values.
    fn temporal_base(samples: &[Vec<u16>]) -> Vec<u8> {
        let values: Vec<u16> = samples.concat();
        let mut b = vec![0x70, values.len() as u8];
        b.extend(LAYOUT.iter().cycle().take(values.len()));
        values.iter().for_each(|v| b.extend(v.to_le_bytes()));
        b
    }

    #[test]
    fn raw_and_temporal_batches_decode_exactly_and_follow_the_device() {
        let mut st = DecoderState::default();
        // Raw, with the firmware's Base64 padding bug (one zero byte more).
        let s = [sample(0), sample(1)];
        let mut raw = vec![0x00, 20];
        s.concat().iter().for_each(|v| raw.extend(v.to_le_bytes()));
        raw.push(0);
        let b = decode(&raw, &LAYOUT, Some(1_000), &mut st).unwrap();
        assert_eq!((b.mask, b.samples.clone()), (0x03FF, s.to_vec()));
        raw.extend([0, 0]);
        assert_eq!(decode(&raw, &LAYOUT, Some(1_001), &mut st).unwrap_err().reason(), "malformed");
        // Two bases, then a delta predicted as 2·prev − prev2 per register.
        decode(&temporal_base(&[sample(0), sample(2)]), &LAYOUT, Some(2_000), &mut st).unwrap();
        decode(&temporal_base(&[sample(3), sample(4)]), &LAYOUT, Some(3_000), &mut st).unwrap();
        // Predicted: sample(6) (a straight line, +2 per batch); actual values
        // differ by +5, −7, +100 (8-bit form), −2000 (16-bit form).
        let mut want = sample(6);
        want[0] += 5;
        want[1] -= 7;
        want[3] += 100;
        want[9] -= 2000;
        let mut d = vec![0x71, 10];
        for (i, (&w, &p)) in want.iter().zip(&sample(6)).enumerate() {
            let delta = i32::from(w) - i32::from(p);
            match delta {
                -63..=63 => d.push(
                    0x80 | (delta.unsigned_abs() as u8 & 0x3F) | if delta < 0 { 0x40 } else { 0 },
                ),
                -127..=127 => d.extend([0x00, delta as i8 as u8]),
                _ => {
                    d.push(0x01);
                    d.extend((delta as i16).to_le_bytes());
                }
            }
            let _ = i;
        }
        let b = decode(&d, &LAYOUT, Some(4_000), &mut st).unwrap();
        assert_eq!(b.samples, vec![want.clone()]);
        // A restart (the clock goes back) forgets the encoder state.
        assert_eq!(decode(&d, &LAYOUT, Some(10), &mut st).unwrap_err().reason(), "needs_state");
        // So does a batch the server could not decode.
        let mut st = DecoderState::default();
        decode(&temporal_base(&[sample(0)]), &LAYOUT, None, &mut st).unwrap();
        decode(&temporal_base(&[sample(0)]), &LAYOUT, None, &mut st).unwrap();
        assert_eq!(decode(&[0x50, 10, 0], &LAYOUT, None, &mut st).unwrap_err().reason(), "lossy");
        assert_eq!(decode(&d, &LAYOUT, None, &mut st).unwrap_err().reason(), "needs_state");
    }

    #[test]
    fn dictionary_batches_decode_only_when_nothing_is_ambiguous() {
        let mut st = DecoderState::default();
        let pattern = DICTIONARY[3];
        // Two samples (20 values), every value a small positive delta from
        // pattern 3: the mask's 16 bits cannot place them, but a delta at
        // every position can.
        let values: Vec<u16> = (0..20).map(|i| pattern[i % 10] + 1 + i as u16).collect();
        let mut p = vec![0xD0, 3, 20, 0xFF, 0xFF];
        p.extend(values.iter().enumerate().map(|(i, v)| 0x80 | (v - pattern[i % 10]) as u8));
        let b = decode(&p, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.samples, vec![values[..10].to_vec(), values[10..].to_vec()]);
        // A large delta in the three-byte form is exact too.
        let mut big = p.clone();
        big[5] = 0x00;
        big.splice(6..6, 1000i16.to_le_bytes());
        let b = decode(&big, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.samples[0][0], pattern[0] + 1000);
        // A negative one-byte delta shares its byte with positive ones.
        let mut neg = p.clone();
        neg[6] = 0x80 | 0x7F;
        assert_eq!(decode(&neg, &LAYOUT, None, &mut st).unwrap_err().reason(), "lossy");
        // Over 16 values with a zero delta somewhere: positions are lost.
        let mut gap = p.clone();
        gap.remove(20);
        assert_eq!(decode(&gap, &LAYOUT, None, &mut st).unwrap_err().reason(), "lossy");
        // Up to 16 values the mask places them, zero deltas included.
        let one: Vec<u16> =
            pattern.iter().enumerate().map(|(i, v)| if i == 4 { v + 9 } else { *v }).collect();
        let b = decode(&[0xD0, 3, 10, 0b1_0000, 0, 0x89], &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.samples, vec![one]);
    }

    #[test]
    fn learned_patterns_are_followed() {
        let mut st = DecoderState::default();
        // Night: far from every starting pattern, so the device learns it as pattern 4.
        let night = vec![2300u16, 0, 50, 0, 0, 0, 0, 300, 100, 0];
        let mut raw = vec![0x00, 10];
        night.iter().for_each(|v| raw.extend(v.to_le_bytes()));
        decode(&raw, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(st.learned, vec![<[u16; 10]>::try_from(night.clone()).unwrap()]);
        let b = decode(&[0xD0, 4, 10, 0b1, 0, 0x82], &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.samples[0][0], 2302);
        // Once a batch is missed, a learned pattern may differ: not used.
        decode(&[0x50, 10, 0], &LAYOUT, None, &mut st).unwrap_err();
        let e = decode(&[0xD0, 4, 10, 0b1, 0, 0x82], &LAYOUT, None, &mut st).unwrap_err();
        assert_eq!(e.reason(), "needs_state");
        // The starting patterns never change.
        assert!(decode(&[0xD0, 0, 10, 0, 0], &LAYOUT, None, &mut st).is_ok());
    }

    #[test]
    fn bit_packed_batches_decode_unless_the_encoder_corrupted_them() {
        let mut st = DecoderState::default();
        // 9 bits: no value spans three bytes.
        let values: Vec<u16> = (0..10).map(|i| 300 + i * 7).collect();
        let mut bits = vec![0u8; (10 * 9usize).div_ceil(8)];
        for (i, v) in values.iter().enumerate() {
            for k in 0..9 {
                if v >> (8 - k) & 1 == 1 {
                    let at = i * 9 + k;
                    bits[at / 8] |= 0x80 >> (at % 8);
                }
            }
        }
        let mut p = vec![0x01, 9, 10];
        p.extend(&bits);
        assert_eq!(decode(&p, &LAYOUT, None, &mut st).unwrap().samples, vec![values]);
        // 13 bits: the second value starts at bit 13, spanning three bytes.
        let p = [vec![0x01, 13, 10], vec![0u8; 17]].concat();
        assert_eq!(decode(&p, &LAYOUT, None, &mut st).unwrap_err().reason(), "lossy");
    }

    #[test]
    fn bad_packets_are_named() {
        let mut st = DecoderState::default();
        for (bytes, layout, reason) in [
            (vec![], &LAYOUT[..], "malformed"),
            (vec![0x00, 20, 1, 2], &LAYOUT[..], "malformed"),
            (vec![0x42, 1, 2], &LAYOUT[..], "unknown_method"),
            (vec![0x00, 3, 0, 0, 0, 0, 0, 0], &LAYOUT[..], "layout"),
            (vec![0x00, 2, 0, 0, 0, 0], &[3u8, 3][..], "layout"),
            (
                temporal_base(&[vec![1; 10]])
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| if i == 2 { 12 } else { b })
                    .collect(),
                &LAYOUT[..],
                "layout",
            ),
        ] {
            assert_eq!(
                decode(&bytes, layout, None, &mut st).unwrap_err().reason(),
                reason,
                "{bytes:?}"
            );
        }
        // A layout in another order is stored in address order.
        let b = decode(&[0x00, 2, 7, 0, 9, 0], &[9, 2], None, &mut st).unwrap();
        assert_eq!((b.mask, b.samples), (0b10_0000_0100, vec![vec![9, 7]]));
    }
}
