//! Bit streams, most significant bit first, and the Elias-gamma code.

use alloc::vec::Vec;

use super::CodecError;

/// Appends bits to a byte vector.
pub struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    n: u32,
}

impl<'a> BitWriter<'a> {
    /// Writes after what `out` holds.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter { out, acc: 0, n: 0 }
    }

    /// Writes the low `bits` bits of `v` (`bits` ≤ 64).
    pub fn put(&mut self, v: u64, bits: u32) {
        debug_assert!(bits <= 64);
        if bits > 32 {
            self.put(v >> 32, bits - 32);
            self.put(v & 0xFFFF_FFFF, 32);
            return;
        }
        if bits == 0 {
            return;
        }
        let v = v & ((1u64 << bits) - 1);
        self.acc = (self.acc << bits) | v;
        self.n += bits;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
        self.acc &= (1u64 << self.n) - 1;
    }

    /// Writes `v` in the Elias-gamma code of `v + 1`: 1 bit for 0, 3 for 1..=2,
    /// 5 for 3..=6, ..., 129 for `u64::MAX`.
    pub fn gamma(&mut self, v: u64) {
        let n = u128::from(v) + 1;
        let len = 128 - n.leading_zeros();
        for _ in 0..len - 1 {
            self.put(0, 1);
        }
        if len > 64 {
            self.put(1, 1);
            self.put(n as u64, 64);
        } else {
            self.put(n as u64, len);
        }
    }

    /// Pads with zero bits to a byte boundary.
    pub fn finish(mut self) {
        if self.n > 0 {
            let pad = 8 - self.n;
            self.put(0, pad);
        }
    }
}

/// Bits of a gamma code of `v`.
pub fn gamma_len(v: u64) -> u32 {
    let n = u128::from(v) + 1;
    2 * (128 - n.leading_zeros()) - 1
}

/// Reads bits from a byte slice.
pub struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next bit, counted from the slice's start.
    at: usize,
}

impl<'a> BitReader<'a> {
    /// Reads `bytes` from bit 0.
    pub fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, at: 0 }
    }

    /// Bits not read yet.
    pub fn left(&self) -> usize {
        self.bytes.len() * 8 - self.at
    }

    /// Reads `bits` bits (≤ 64) as an unsigned number.
    pub fn get(&mut self, bits: u32) -> Result<u64, CodecError> {
        if bits as usize > self.left() {
            return Err(CodecError::Truncated);
        }
        let mut v: u64 = 0;
        let mut need = bits;
        while need > 0 {
            let byte = self.bytes[self.at / 8];
            let used = (self.at % 8) as u32;
            let take = need.min(8 - used);
            let chunk = (byte >> (8 - used - take)) & (((1u16 << take) - 1) as u8);
            v = (v << take) | u64::from(chunk);
            self.at += take as usize;
            need -= take;
        }
        Ok(v)
    }

    /// Reads a gamma-coded value (see [`BitWriter::gamma`]).
    pub fn gamma(&mut self) -> Result<u64, CodecError> {
        let mut zeros = 0u32;
        while self.get(1)? == 0 {
            zeros += 1;
            if zeros > 64 {
                return Err(CodecError::BadValue);
            }
        }
        let rest = self.get(zeros.min(64))?;
        // n = 1 followed by `zeros` bits; the value is n - 1.
        let n: u128 = (1u128 << zeros) | u128::from(rest);
        u64::try_from(n - 1).map_err(|_| CodecError::BadValue)
    }

    /// Checks that what is left is the zero padding of the last byte.
    pub fn finish(self) -> Result<(), CodecError> {
        let left = self.left();
        if left >= 8 {
            return Err(CodecError::TrailingBytes { count: left / 8 });
        }
        let mut r = self;
        if r.get(left as u32)? != 0 {
            return Err(CodecError::BadPadding);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_gamma_round_trip() {
        let values = [0u64, 1, 2, 3, 6, 7, 255, 1 << 40, u64::MAX - 1, u64::MAX];
        let mut out = Vec::new();
        let mut w = BitWriter::new(&mut out);
        for (i, v) in values.iter().enumerate() {
            w.gamma(*v);
            w.put(*v, (i * 7 % 65) as u32);
            w.put(*v, 64);
        }
        w.finish();
        let mut r = BitReader::new(&out);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(r.gamma().unwrap(), *v);
            let bits = (i * 7 % 65) as u32;
            let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            assert_eq!(r.get(bits).unwrap(), v & mask);
            assert_eq!(r.get(64).unwrap(), *v);
        }
        r.finish().unwrap();
        assert_eq!(gamma_len(0), 1);
        assert_eq!(gamma_len(2), 3);
        assert_eq!(gamma_len(u64::MAX), 129);
    }
}
