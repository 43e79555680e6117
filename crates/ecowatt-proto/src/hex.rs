//! Hex text for frames, as the Inverter SIM HTTP API carries them: uppercase
//! on output, either case accepted on input.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a hex string could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HexError {
    /// The string has an odd number of digits.
    OddLength {
        /// Number of characters in the string.
        len: usize,
    },
    /// A character that is not a hex digit, at this byte index.
    InvalidDigit {
        /// Byte index of the offending character.
        index: usize,
    },
}

impl fmt::Display for HexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HexError::OddLength { len } => write!(f, "hex text has an odd length ({len})"),
            HexError::InvalidDigit { index } => write!(f, "not a hex digit at index {index}"),
        }
    }
}

impl core::error::Error for HexError {}

const DIGITS: &[u8; 16] = b"0123456789ABCDEF";

/// Encodes bytes as uppercase hex.
pub fn encode_upper(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
    out
}

/// Decodes hex text (either case, no separators).
pub fn decode(text: &str) -> Result<Vec<u8>, HexError> {
    let raw = text.as_bytes();
    if raw.len() % 2 != 0 {
        return Err(HexError::OddLength { len: raw.len() });
    }
    let nibble = |index: usize| -> Result<u8, HexError> {
        match raw[index] {
            c @ b'0'..=b'9' => Ok(c - b'0'),
            c @ b'a'..=b'f' => Ok(c - b'a' + 10),
            c @ b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::InvalidDigit { index }),
        }
    };
    (0..raw.len() / 2).map(|i| Ok((nibble(2 * i)? << 4) | nibble(2 * i + 1)?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        assert_eq!(encode_upper(&[0x11, 0x03, 0xC6, 0x9b]), "1103C69B");
        assert_eq!(decode("1103c69B").unwrap(), [0x11, 0x03, 0xC6, 0x9B]);
        assert_eq!(decode("110"), Err(HexError::OddLength { len: 3 }));
        assert_eq!(decode("11G3"), Err(HexError::InvalidDigit { index: 2 }));
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }
}
