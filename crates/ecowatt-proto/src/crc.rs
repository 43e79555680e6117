//! CRC-16/MODBUS: init `0xFFFF`, reflected polynomial `0xA001`, no final xor,
//! transmitted low byte first.

/// Lookup table for the reflected polynomial `0xA001`, built at compile time.
const TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Computes the CRC-16/MODBUS of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in data {
        crc = (crc >> 8) ^ TABLE[usize::from((crc as u8) ^ byte)];
    }
    crc
}

/// The two CRC bytes as they go on the wire (low byte first).
pub fn crc16_bytes(data: &[u8]) -> [u8; 2] {
    crc16(data).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_from_the_crc_catalogue() {
        // "123456789" -> 0x4B37 (CRC-16/MODBUS check value, reveng catalogue).
        assert_eq!(crc16(b"123456789"), 0x4B37);
    }

    #[test]
    fn known_frame_from_the_sim_reference() {
        // inverter-sim-api.md: read 2 registers from 0 = 110300000002C69B.
        assert_eq!(crc16_bytes(&[0x11, 0x03, 0x00, 0x00, 0x00, 0x02]), [0xC6, 0x9B]);
    }
}
