//! The original firmware's compressed batches (`compressed_binary`, one per
//! batch of samples, values sample by sample, register ids as its `RegID`:
//! EcoWatt's register addresses). Its encoder chose per batch the smallest
//! of four methods, and some of them lose information (docs/migration.md),
//! so every value is decoded exactly or not at all, and a sample is stored
//! only when all its values are known:
//!
//! | marker | method | values known |
//! |---|---|---|
//! | `0x00` | raw, little-endian | all |
//! | `0x01` | bit-packed, MSB first | all but those spanning three bytes (the encoder corrupts them) |
//! | `0x70` | temporal base: layout and raw values | all |
//! | `0x71` | temporal delta from `2·prev − prev2` | those whose register's last two batch values are known |
//! | `0xD0` | dictionary pattern + deltas | those with an unambiguous delta, when every position is known |
//! | `0x50` | semantic run-length | none: it merges values within a tolerance |
//!
//! Decoding keeps the state the device keeps ([`DecoderState`]): the last
//! value of each register in its last two batches (for `0x71`) and the
//! patterns its dictionary learned (for `0xD0` indexes above 3), reset when
//! the device restarts.

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
    /// server could not read whole may have taught it one).
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

/// Why values were not decoded (each with a stable reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    /// The bytes end early or carry more than the firmware's padding.
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    /// An unknown method marker (or a headerless packet of under 9 values).
    #[error("unknown method 0x{0:02x}")]
    Unknown(u8),
    /// The original encoder lost information.
    #[error("the original encoder lost information: {0}")]
    Lossy(&'static str),
    /// They depend on earlier batches not decoded.
    #[error("they depend on earlier batches not decoded: {0}")]
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

/// A decoded batch: its complete samples of the registers in `mask`,
/// values in address order, and how many samples had a value not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Register mask (bit `i`: register `i`).
    pub mask: u16,
    /// Complete samples, oldest first, each with its index in the batch.
    pub samples: Vec<(usize, Vec<u16>)>,
    /// Samples in the batch.
    pub total: usize,
    /// Why some samples are missing (`None` when none is).
    pub missing: Option<Undecodable>,
}

/// Values as decoded: each known or not, with why not.
struct Values {
    values: Vec<Option<u16>>,
    selection: Vec<u8>,
    why: Option<Undecodable>,
}

impl Values {
    fn all(values: Vec<u16>, selection: Vec<u8>) -> Values {
        Values { values: values.into_iter().map(Some).collect(), selection, why: None }
    }
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

/// The register of each of `count` values: `layout` repeated.
fn per_layout(layout: &[u8], count: usize) -> Result<Vec<u8>, Undecodable> {
    if layout.is_empty() || count == 0 || count % layout.len() != 0 {
        return Err(Undecodable::Layout("the count is not a whole number of samples"));
    }
    Ok(layout.iter().copied().cycle().take(count).collect())
}

/// Decodes one packet. `layout` is the register ids of one sample (the
/// packet's `register_layout`), `millis` its `timestamp`. `state` follows
/// the device whether or not the packet decodes.
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
        Ok(v) => learn(state, v),
        Err(_) => {
            // The device updated its state from values the server does not have.
            state.recent.clear();
            if state.learned.len() + DICTIONARY.len() < DICTIONARY_MAX {
                state.learned_known = false;
            }
        }
    }
    batch(decoded?, layout.len())
}

/// The values of a packet and each one's register id.
fn values(bytes: &[u8], layout: &[u8], state: &DecoderState) -> Result<Values, Undecodable> {
    let marker = *bytes.first().ok_or(Undecodable::Malformed("empty"))?;
    let count = usize::from(*bytes.get(1).ok_or(Undecodable::Malformed("short"))?);
    match marker {
        0x00 => {
            let data = take(bytes, 2, 2 * count, "raw")?;
            ends_at(bytes, 2 + 2 * count, "raw")?;
            Ok(Values::all(data.chunks(2).map(le).collect(), per_layout(layout, count)?))
        }
        0x01 => bit_packed(bytes, layout),
        0x70 => {
            let selection = take(bytes, 2, count, "temporal base")?.to_vec();
            let data = take(bytes, 2 + count, 2 * count, "temporal base")?;
            ends_at(bytes, 2 + 3 * count, "temporal base")?;
            Ok(Values::all(data.chunks(2).map(le).collect(), selection))
        }
        0x71 => temporal_delta(bytes, per_layout(layout, count)?, state),
        0xD0 => {
            let count = usize::from(*bytes.get(2).ok_or(Undecodable::Malformed("dictionary"))?);
            dictionary(bytes, per_layout(layout, count)?, state)
        }
        0x50 => {
            let selection = per_layout(layout, count)?;
            Ok(Values {
                values: vec![None; selection.len()],
                selection,
                why: Some(Undecodable::Lossy(
                    "semantic run-length merges values within a tolerance",
                )),
            })
        }
        other => Err(Undecodable::Unknown(other)),
    }
}

fn bit_packed(bytes: &[u8], layout: &[u8]) -> Result<Values, Undecodable> {
    let bits = usize::from(*bytes.get(1).ok_or(Undecodable::Malformed("bit-packed"))?);
    let count = usize::from(*bytes.get(2).ok_or(Undecodable::Malformed("bit-packed"))?);
    if !(1..=16).contains(&bits) {
        return Err(Undecodable::Malformed("bit-packed"));
    }
    let len = (count * bits).div_ceil(8);
    let data = take(bytes, 3, len, "bit-packed")?;
    ends_at(bytes, 3 + len, "bit-packed")?;
    let mut why = None;
    let values = (0..count)
        .map(|i| {
            let at = i * bits;
            if at % 8 + bits > 16 {
                why = Some(Undecodable::Lossy("a bit-packed value spans three bytes"));
                return None;
            }
            let byte = at / 8;
            let two = u32::from(data[byte]) << 8 | u32::from(*data.get(byte + 1).unwrap_or(&0));
            Some(((two >> (16 - at % 8 - bits)) & ((1 << bits) - 1)) as u16)
        })
        .collect();
    Ok(Values { values, selection: per_layout(layout, count)?, why })
}

fn temporal_delta(
    bytes: &[u8],
    selection: Vec<u8>,
    state: &DecoderState,
) -> Result<Values, Undecodable> {
    let none = [None; 10];
    let prev1 = state.recent.first().unwrap_or(&none);
    let prev2 = state.recent.get(1).unwrap_or(&none);
    let mut at = 2;
    let mut why = None;
    let mut values = Vec::with_capacity(selection.len());
    for &reg in &selection {
        let b = *bytes.get(at).ok_or(Undecodable::Malformed("temporal delta"))?;
        let delta: i32 = if b & 0x80 != 0 {
            at += 1;
            let m = i32::from(b & 0x3F);
            if b & 0x40 != 0 { -m } else { m }
        } else if b == 0x00 {
            at += 2;
            i32::from(take(bytes, at - 1, 1, "temporal delta")?[0] as i8)
        } else if b == 0x01 {
            at += 3;
            i32::from(le(take(bytes, at - 2, 2, "temporal delta")?) as i16)
        } else {
            return Err(Undecodable::Malformed("temporal delta"));
        };
        let r = usize::from(reg);
        let known = prev1.get(r).copied().flatten().zip(prev2.get(r).copied().flatten());
        values.push(known.map(|(p1, p2)| {
            let mut predicted = 2 * i32::from(p1) - i32::from(p2);
            if !(0..=65535).contains(&predicted) {
                predicted = i32::from(p1);
            }
            (predicted + delta).rem_euclid(65536) as u16
        }));
        if known.is_none() {
            why = Some(Undecodable::NeedsState(
                "a register's values in the two batches before are not known",
            ));
        }
    }
    ends_at(bytes, at, "temporal delta")?;
    Ok(Values { values, selection, why })
}

fn dictionary(
    bytes: &[u8],
    selection: Vec<u8>,
    state: &DecoderState,
) -> Result<Values, Undecodable> {
    let index = usize::from(bytes[1]);
    let count = selection.len();
    let mask = le(take(bytes, 3, 2, "dictionary")?);
    let pattern = match DICTIONARY.get(index) {
        Some(p) => Some(*p),
        None if state.learned_known => Some(
            *state
                .learned
                .get(index - DICTIONARY.len())
                .ok_or(Undecodable::Malformed("dictionary"))?,
        ),
        None => None,
    };
    // Deltas: one byte `0x80 | d` (the sign folded into bit 6, so any
    // byte with bit 6 set is ambiguous: `None`), or `0x00` and 16 bits.
    let mut deltas: Vec<Option<i32>> = Vec::new();
    let mut at = 5;
    while at < bytes.len() {
        let (b, rest) = (bytes[at], bytes.len() - at);
        if b & 0x80 != 0 {
            deltas.push((b & 0x40 == 0).then_some(i32::from(b & 0x3F)));
            at += 1;
        } else if b == 0 && rest >= 3 {
            deltas.push(Some(i32::from(le(&bytes[at + 1..at + 3]) as i16)));
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
        return Ok(Values {
            values: vec![None; count],
            selection,
            why: Some(Undecodable::Lossy("more than 16 values and not every one has a delta")),
        });
    };
    if positions.len() != deltas.len() {
        return Err(Undecodable::Malformed("dictionary"));
    }
    let Some(pattern) = pattern else {
        return Ok(Values {
            values: vec![None; count],
            selection,
            why: Some(Undecodable::NeedsState("a learned pattern is not known")),
        });
    };
    let mut values: Vec<Option<i32>> = selection
        .iter()
        .map(|&r| Some(i32::from(*pattern.get(usize::from(r)).unwrap_or(&0))))
        .collect();
    let mut why = None;
    for (p, d) in positions.into_iter().zip(deltas) {
        values[p] = values[p].zip(d).map(|(v, d)| v + d);
        if d.is_none() {
            why = Some(Undecodable::Lossy(
                "a one-byte delta of 64 or more, or negative, is ambiguous",
            ));
        }
    }
    let values = values.into_iter().map(|v| v.map(|v| v.rem_euclid(65536) as u16)).collect();
    Ok(Values { values, selection, why })
}

/// Follows the device's state after a batch it encoded from `v`.
fn learn(state: &mut DecoderState, v: &Values) {
    let mut last = [None; 10];
    for (&value, &r) in v.values.iter().zip(&v.selection) {
        if let Some(slot) = last.get_mut(usize::from(r)) {
            *slot = value;
        }
    }
    state.recent.insert(0, last);
    state.recent.truncate(2);
    if !state.learned_known || DICTIONARY.len() + state.learned.len() >= DICTIONARY_MAX {
        return;
    }
    // Learning looks at every value: one not known hides what it learned.
    let Some(values) = v.values.iter().copied().collect::<Option<Vec<u16>>>() else {
        state.learned_known = false;
        return;
    };
    let distance = |p: &[u16; 10]| -> u32 {
        values
            .iter()
            .zip(&v.selection)
            .map(|(&x, &r)| {
                (i32::from(x) - i32::from(*p.get(usize::from(r)).unwrap_or(&0))).unsigned_abs()
            })
            .sum()
    };
    let best = DICTIONARY.iter().chain(&state.learned).map(distance).min().unwrap_or(u32::MAX);
    if best / values.len().max(1) as u32 >= MATCH_AVG {
        let mut p = [0u16; 10];
        for (&x, &r) in values.iter().zip(&v.selection) {
            if let Some(slot) = p.get_mut(usize::from(r)) {
                *slot = x;
            }
        }
        state.learned.push(p);
    }
}

/// Values in the device's order as samples of a register mask; complete
/// samples only.
fn batch(v: Values, width: usize) -> Result<Batch, Undecodable> {
    let Values { values, selection, why } = v;
    let count = selection.len();
    if width == 0 || count == 0 {
        return Err(Undecodable::Layout("no values"));
    }
    let sample_layout = &selection[..width.min(count)];
    if count % width != 0 || selection.chunks(width).any(|c| c != sample_layout) {
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
    let total = count / width;
    let samples: Vec<(usize, Vec<u16>)> = values
        .chunks(width)
        .enumerate()
        .filter_map(|(k, s)| {
            order.iter().map(|&i| s[i]).collect::<Option<Vec<u16>>>().map(|s| (k, s))
        })
        .collect();
    let missing =
        (samples.len() < total).then(|| why.unwrap_or(Undecodable::Lossy("values not known")));
    Ok(Batch { mask, samples, total, missing })
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

    fn complete(b: &Batch) -> Vec<Vec<u16>> {
        b.samples.iter().map(|(_, s)| s.clone()).collect()
    }

    /// `0x71` for `want` against the prediction `predicted`, in the
    /// encoder's three forms.
    fn temporal_delta(want: &[u16], predicted: &[u16]) -> Vec<u8> {
        let mut d = vec![0x71, want.len() as u8];
        for (&w, &p) in want.iter().zip(predicted) {
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
        }
        d
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
        assert_eq!((b.mask, complete(&b), b.total, b.missing), (0x03FF, s.to_vec(), 2, None));
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
        let d = temporal_delta(&want, &sample(6));
        let b = decode(&d, &LAYOUT, Some(4_000), &mut st).unwrap();
        assert_eq!(complete(&b), vec![want.clone()]);
        // A restart (the clock goes back) forgets the encoder state.
        let b = decode(&d, &LAYOUT, Some(10), &mut st).unwrap();
        assert_eq!((b.samples.len(), b.missing.map(|m| m.reason())), (0, Some("needs_state")));
        // So does a batch the server could not read, for its registers.
        let mut st = DecoderState::default();
        decode(&temporal_base(&[sample(0)]), &LAYOUT, None, &mut st).unwrap();
        decode(&temporal_base(&[sample(0)]), &LAYOUT, None, &mut st).unwrap();
        let b = decode(&[0x50, 10, 0], &LAYOUT, None, &mut st).unwrap();
        assert_eq!((b.samples.len(), b.missing.map(|m| m.reason())), (0, Some("lossy")));
        let b = decode(&temporal_delta(&sample(0), &sample(0)), &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.missing.map(|m| m.reason()), Some("needs_state"));
        // A malformed packet forgets everything (the device learned from it).
        decode(&[0x42], &LAYOUT, None, &mut st).unwrap_err();
        assert!(st.recent.is_empty() && !st.learned_known);
    }

    #[test]
    fn dictionary_values_decode_only_when_unambiguous() {
        let mut st = DecoderState::default();
        let pattern = DICTIONARY[3];
        // Two samples (20 values), every value a small positive delta from
        // pattern 3: the mask's 16 bits cannot place them, but a delta at
        // every position can.
        let values: Vec<u16> = (0..20).map(|i| pattern[i % 10] + 1 + i as u16).collect();
        let mut p = vec![0xD0, 3, 20, 0xFF, 0xFF];
        p.extend(values.iter().enumerate().map(|(i, v)| 0x80 | (v - pattern[i % 10]) as u8));
        let b = decode(&p, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(complete(&b), vec![values[..10].to_vec(), values[10..].to_vec()]);
        // A large delta in the three-byte form is exact too.
        let mut big = p.clone();
        big[5] = 0x00;
        big.splice(6..6, 1000i16.to_le_bytes());
        let b = decode(&big, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.samples[0].1[0], pattern[0] + 1000);
        // A negative one-byte delta shares its byte with positive ones: its
        // sample is not stored, the other is.
        let mut neg = p.clone();
        neg[6] = 0x80 | 0x7F;
        let b = decode(&neg, &LAYOUT, None, &mut st).unwrap();
        assert_eq!(
            (b.samples.len(), b.samples[0].0, b.missing.map(|m| m.reason())),
            (1, 1, Some("lossy"))
        );
        // ...and what the device learned from it is not known.
        assert!(!st.learned_known);
        // Over 16 values with a zero delta somewhere: no position is known.
        let mut gap = p.clone();
        gap.remove(20);
        let b = decode(&gap, &LAYOUT, None, &mut st).unwrap();
        assert_eq!((b.samples.len(), b.total), (0, 2));
        // Up to 16 values the mask places them, zero deltas included.
        let one: Vec<u16> =
            pattern.iter().enumerate().map(|(i, v)| if i == 4 { v + 9 } else { *v }).collect();
        let b = decode(&[0xD0, 3, 10, 0b1_0000, 0, 0x89], &LAYOUT, None, &mut st).unwrap();
        assert_eq!(complete(&b), vec![one]);
        // A malformed stream is refused whole.
        assert_eq!(
            decode(&[0xD0, 3, 10, 1, 0, 0x05], &LAYOUT, None, &mut st).unwrap_err().reason(),
            "malformed"
        );
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
        assert_eq!(b.samples[0].1[0], 2302);
        // Once a batch is not read whole, a learned pattern may differ: not used.
        decode(&[0x50, 10, 0], &LAYOUT, None, &mut st).unwrap();
        let b = decode(&[0xD0, 4, 10, 0b1, 0, 0x82], &LAYOUT, None, &mut st).unwrap();
        assert_eq!(b.missing.map(|m| m.reason()), Some("needs_state"));
        // The starting patterns never change.
        assert_eq!(decode(&[0xD0, 0, 10, 0, 0], &LAYOUT, None, &mut st).unwrap().samples.len(), 1);
    }

    #[test]
    fn bit_packed_values_decode_unless_the_encoder_corrupted_them() {
        let mut st = DecoderState::default();
        let pack = |values: &[u16], bits: usize| {
            let mut out = vec![0u8; (values.len() * bits).div_ceil(8)];
            for (i, v) in values.iter().enumerate() {
                for k in 0..bits {
                    if v >> (bits - 1 - k) & 1 == 1 {
                        let at = i * bits + k;
                        out[at / 8] |= 0x80 >> (at % 8);
                    }
                }
            }
            [vec![0x01, bits as u8, values.len() as u8], out].concat()
        };
        // 9 bits: no value spans three bytes.
        let values: Vec<u16> = (0..10).map(|i| 300 + i * 7).collect();
        assert_eq!(
            complete(&decode(&pack(&values, 9), &LAYOUT, None, &mut st).unwrap()),
            vec![values]
        );
        // 13 bits: the second value starts at bit 13, spanning three bytes.
        let values: Vec<u16> = (0..20).map(|i| 4000 + i).collect();
        let b = decode(&pack(&values, 13), &LAYOUT, None, &mut st).unwrap();
        assert_eq!((b.samples.len(), b.missing.map(|m| m.reason())), (0, Some("lossy")));
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
        assert_eq!((b.mask, complete(&b)), (0b10_0000_0100, vec![vec![9, 7]]));
    }
}
