//! The key-value store on raw NOR flash (the ESP32-C3's storage partition):
//! log-structured, so every `set` is one append and a power cut at any word
//! leaves the old value or the new one, never a mix.
//!
//! Layout: the region is cut into erase sectors. A sector in use starts with
//! an 8-byte header (`EWKV`, then its sequence number, higher is newer);
//! records follow, each `[0xEC, key length, value length (u16 LE), CRC-32 (LE)]`
//! then key and value padded to the word size. A record counts only if its
//! CRC holds; an empty value is a removal. The newest record of a key wins
//! (by sector sequence, then position).
//!
//! Power cuts: a cut inside a record leaves bytes that fail the CRC; the
//! scanner steps over them word by word until the next valid header, and new
//! records go after the last programmed word. A sector is always erased just
//! before it is opened. Space comes back by compaction: when only one free
//! sector is left, the oldest sector's live records are copied into a new
//! head, a marker record says the copy is complete, and the oldest is
//! erased. A cut during the copy (no marker) is undone at the next mount by
//! erasing the incomplete copy; a cut during the erase (marker present) is
//! finished by erasing the old sector again. So at rest one sector is free.
//!
//! RAM: a sorted index of (key hash, record address), 8 bytes per live key;
//! values are read from flash when asked for.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::kv::{KeyValue, KvError};

/// Raw NOR flash: erase sets a sector to `0xFF`; a write only clears bits, at
/// word-aligned offsets, in whole words.
pub trait NorFlash {
    /// The write unit, bytes (a power of two, at most 16).
    const WORD: usize;
    /// The erase unit, bytes.
    const SECTOR: usize;
    /// Sectors in the region.
    fn sectors(&self) -> u32;
    /// Reads `buf.len()` bytes at `addr` (relative to the region).
    fn read(&mut self, addr: u32, buf: &mut [u8]) -> Result<(), KvError>;
    /// Programs `data` (whole words) at word-aligned `addr`.
    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), KvError>;
    /// Erases sector `index`.
    fn erase(&mut self, index: u32) -> Result<(), KvError>;
}

const SECTOR_MAGIC: &[u8; 4] = b"EWKV";
const RECORD: u8 = 0xEC;
/// A record without key: the compaction's copy is complete.
const MARKER: u8 = 0xED;
const HEADER: usize = 8;

/// CRC-32 (IEEE, reflected), bitwise: records are small.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
    }
    !crc
}

/// FNV-1a, for the index.
fn hash(key: &str) -> u32 {
    key.bytes().fold(0x811C_9DC5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

fn err(what: &str) -> KvError {
    KvError(String::from(what))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sector {
    /// Erased, or to be erased before use.
    Free,
    /// In use, with its sequence number.
    Used(u32),
}

/// A record as found in flash.
struct Found {
    kind: u8,
    key_len: usize,
    value_len: usize,
    /// Bytes it takes, padded.
    size: usize,
}

/// The store over a flash region.
pub struct FlashKv<F> {
    flash: F,
    sectors: Vec<Sector>,
    /// (key hash, record address), sorted by hash.
    index: Vec<(u32, u32)>,
    head: u32,
    /// Where the next record goes in the head sector.
    cursor: usize,
}

impl<F: NorFlash> FlashKv<F> {
    fn word() -> usize {
        F::WORD.max(4)
    }

    fn pad(n: usize) -> usize {
        n.div_ceil(Self::word()) * Self::word()
    }

    /// The largest record (header, key and value, padded) the store takes:
    /// one that fits an empty sector with room for a compaction marker.
    pub fn max_record() -> usize {
        F::SECTOR - 2 * HEADER
    }

    /// Mounts the store: scans every sector, builds the index, and finishes
    /// or undoes a compaction a power cut interrupted. An empty (erased or
    /// never used) region is a valid empty store.
    pub fn mount(flash: F) -> Result<Self, KvError> {
        if flash.sectors() < 3 || F::SECTOR < 256 || F::SECTOR % Self::word() != 0 {
            return Err(err("the region needs 3 sectors or more of 256 bytes or more"));
        }
        let n = flash.sectors();
        let mut kv = FlashKv {
            flash,
            sectors: vec![Sector::Free; n as usize],
            index: Vec::new(),
            head: 0,
            cursor: 0,
        };
        for s in 0..n {
            let mut h = [0u8; HEADER];
            kv.flash.read(s * F::SECTOR as u32, &mut h)?;
            if &h[..4] == SECTOR_MAGIC {
                kv.sectors[s as usize] = Sector::Used(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
            }
        }
        let mut order = kv.used_by_age();
        if order.is_empty() {
            kv.open(0, 1)?;
            return Ok(kv);
        }
        let newest = *order.last().expect("not empty");
        let free = kv.sectors.iter().filter(|s| **s == Sector::Free).count();
        if free == 0 && order.len() >= 2 {
            // A compaction was cut short: the newest sector holds (some of)
            // the oldest's live records.
            if kv.scan(newest, &mut |_, _, _| {})?.1 {
                let oldest = order[0];
                kv.flash.erase(oldest)?;
                kv.sectors[oldest as usize] = Sector::Free;
            } else {
                kv.flash.erase(newest)?;
                kv.sectors[newest as usize] = Sector::Free;
            }
            order = kv.used_by_age();
        }
        for &s in &order {
            let mut found = Vec::new();
            let (end, _) =
                kv.scan(s, &mut |addr, key_hash, removal| found.push((addr, key_hash, removal)))?;
            for (addr, key_hash, removal) in found {
                kv.index_record(addr, key_hash, removal)?;
            }
            kv.head = s;
            kv.cursor = end;
        }
        Ok(kv)
    }

    fn used_by_age(&self) -> Vec<u32> {
        let mut used: Vec<(u32, u32)> = (0..self.sectors.len() as u32)
            .filter_map(|s| match self.sectors[s as usize] {
                Sector::Used(seq) => Some((seq, s)),
                Sector::Free => None,
            })
            .collect();
        used.sort_unstable();
        used.into_iter().map(|(_, s)| s).collect()
    }

    /// Reads the record at `addr`, if one is valid there.
    fn record_at(&mut self, addr: u32, limit: usize) -> Result<Option<Found>, KvError> {
        let mut h = [0u8; HEADER];
        if addr as usize + HEADER > limit {
            return Ok(None);
        }
        self.flash.read(addr, &mut h)?;
        let kind = h[0];
        let key_len = usize::from(h[1]);
        let value_len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let size = HEADER + Self::pad(key_len + value_len);
        if !(kind == RECORD || kind == MARKER && key_len == 0 && value_len == 0)
            || addr as usize + size > limit
            || size > Self::max_record()
        {
            return Ok(None);
        }
        let mut body = vec![0u8; key_len + value_len];
        self.flash.read(addr + HEADER as u32, &mut body)?;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if crc != crc32(&[&h[..4], &body]) || core::str::from_utf8(&body[..key_len]).is_err() {
            return Ok(None);
        }
        Ok(Some(Found { kind, key_len, value_len, size }))
    }

    /// Walks the valid records of sector `s`: `f(address, key hash, is a
    /// removal)` for each keyed record; returns where the next record goes
    /// (after the last valid record and the last programmed word) and
    /// whether a compaction marker was seen.
    fn scan(
        &mut self,
        s: u32,
        f: &mut dyn FnMut(u32, u32, bool),
    ) -> Result<(usize, bool), KvError> {
        let base = (s as usize) * F::SECTOR;
        let limit = base + F::SECTOR;
        // Everything after the last programmed word is erased.
        let mut programmed = base + HEADER;
        let mut word = vec![0u8; Self::word()];
        let mut probe = limit;
        while probe > programmed {
            probe -= Self::word();
            self.flash.read(probe as u32, &mut word)?;
            if word.iter().any(|b| *b != 0xFF) {
                programmed = probe + Self::word();
                break;
            }
        }
        let (mut at, mut marker, mut records_end) = (base + HEADER, false, base + HEADER);
        while at < programmed {
            match self.record_at(at as u32, limit)? {
                Some(r) => {
                    if r.kind == MARKER {
                        marker = true;
                    } else {
                        let mut key = vec![0u8; r.key_len];
                        self.flash.read((at + HEADER) as u32, &mut key)?;
                        let key = core::str::from_utf8(&key).map_err(|_| err("key"))?;
                        f(at as u32, hash(key), r.value_len == 0);
                    }
                    at += r.size;
                    records_end = at;
                }
                // Not a record: the rest of a write a power cut stopped.
                None => at += Self::word(),
            }
        }
        // A valid record may end in erased-looking bytes (padding, a value
        // of 0xFF): the next one goes after it.
        Ok((programmed.max(records_end) - base, marker))
    }

    fn key_at(&mut self, addr: u32) -> Result<String, KvError> {
        let mut h = [0u8; HEADER];
        self.flash.read(addr, &mut h)?;
        let mut key = vec![0u8; usize::from(h[1])];
        self.flash.read(addr + HEADER as u32, &mut key)?;
        String::from_utf8(key).map_err(|_| err("key"))
    }

    /// Where `key`'s newest record is, as an index position.
    fn find(&mut self, key: &str) -> Result<Option<usize>, KvError> {
        let h = hash(key);
        let mut i = self.index.partition_point(|(k, _)| *k < h);
        while i < self.index.len() && self.index[i].0 == h {
            if self.key_at(self.index[i].1)? == key {
                return Ok(Some(i));
            }
            i += 1;
        }
        Ok(None)
    }

    fn index_record(&mut self, addr: u32, key_hash: u32, removal: bool) -> Result<(), KvError> {
        let key = self.key_at(addr)?;
        match self.find(&key)? {
            Some(i) if removal => {
                self.index.remove(i);
            }
            Some(i) => self.index[i].1 = addr,
            None if removal => {}
            None => {
                let at = self.index.partition_point(|(k, _)| *k <= key_hash);
                self.index.insert(at, (key_hash, addr));
            }
        }
        Ok(())
    }

    /// Erases sector `s` and opens it as the head with sequence `seq`.
    fn open(&mut self, s: u32, seq: u32) -> Result<(), KvError> {
        self.flash.erase(s)?;
        let mut h = [0xFFu8; HEADER];
        h[..4].copy_from_slice(SECTOR_MAGIC);
        h[4..].copy_from_slice(&seq.to_le_bytes());
        self.flash.write(s * F::SECTOR as u32, &h)?;
        self.sectors[s as usize] = Sector::Used(seq);
        self.head = s;
        self.cursor = HEADER;
        Ok(())
    }

    fn next_seq(&self) -> u32 {
        self.sectors
            .iter()
            .filter_map(|s| match s {
                Sector::Used(q) => Some(*q),
                Sector::Free => None,
            })
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
    }

    fn free_sector(&self) -> Option<u32> {
        (0..self.sectors.len() as u32).find(|s| self.sectors[*s as usize] == Sector::Free)
    }

    /// Appends a record in the head (which has room).
    fn append(&mut self, kind: u8, key: &str, value: &[u8]) -> Result<u32, KvError> {
        let size = HEADER + Self::pad(key.len() + value.len());
        let mut rec = vec![0xFFu8; size];
        rec[0] = kind;
        rec[1] = key.len() as u8;
        rec[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
        rec[HEADER..HEADER + key.len()].copy_from_slice(key.as_bytes());
        rec[HEADER + key.len()..HEADER + key.len() + value.len()].copy_from_slice(value);
        let crc = crc32(&[&rec[..4], &rec[HEADER..HEADER + key.len() + value.len()]]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        if self.cursor + size > F::SECTOR {
            return Err(err("record past the end of the sector"));
        }
        let addr = self.head * F::SECTOR as u32 + self.cursor as u32;
        // The cursor moves first: after a failed write the words it may have
        // programmed are not written over.
        self.cursor += size;
        self.flash.write(addr, &rec)?;
        Ok(addr)
    }

    /// Makes room for a record of `size` bytes in the head: a new sector,
    /// compacting the oldest when only one is free.
    fn room(&mut self, size: usize) -> Result<(), KvError> {
        let mut tries = self.sectors.len();
        // The last bytes of a sector stay for a compaction's marker.
        while self.cursor + size + HEADER > F::SECTOR {
            if tries == 0 {
                return Err(err("store full"));
            }
            tries -= 1;
            let free = self.sectors.iter().filter(|s| **s == Sector::Free).count();
            let target = self.free_sector().ok_or_else(|| err("no free sector"))?;
            let seq = self.next_seq();
            if free >= 2 {
                self.open(target, seq)?;
                continue;
            }
            // Compaction: the oldest sector's live records move to a new head.
            let oldest = self.used_by_age()[0];
            let base = oldest * F::SECTOR as u32;
            let live: Vec<(usize, u32)> = self
                .index
                .iter()
                .enumerate()
                .filter(|(_, (_, a))| (base..base + F::SECTOR as u32).contains(a))
                .map(|(i, (_, a))| (i, *a))
                .collect();
            if self.live_bytes()? + size > (self.sectors.len() - 1) * (F::SECTOR - 2 * HEADER) {
                return Err(err("store full"));
            }
            self.open(target, seq)?;
            for (i, addr) in live {
                let key = self.key_at(addr)?;
                let mut h = [0u8; HEADER];
                self.flash.read(addr, &mut h)?;
                let mut value = vec![0u8; usize::from(u16::from_le_bytes([h[2], h[3]]))];
                self.flash.read(addr + (HEADER + key.len()) as u32, &mut value)?;
                self.index[i].1 = self.append(RECORD, &key, &value)?;
            }
            self.append(MARKER, "", &[])?;
            self.flash.erase(oldest)?;
            self.sectors[oldest as usize] = Sector::Free;
        }
        Ok(())
    }

    /// Bytes the live records take.
    fn live_bytes(&mut self) -> Result<usize, KvError> {
        let mut total = 0;
        for i in 0..self.index.len() {
            let mut h = [0u8; HEADER];
            self.flash.read(self.index[i].1, &mut h)?;
            total += HEADER
                + Self::pad(usize::from(h[1]) + usize::from(u16::from_le_bytes([h[2], h[3]])));
        }
        Ok(total)
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let size = HEADER + Self::pad(key.len() + value.len());
        if key.is_empty() || key.len() > 255 || size > Self::max_record() {
            return Err(err("key or value too large"));
        }
        self.room(size)?;
        let addr = self.append(RECORD, key, value)?;
        self.index_record(addr, hash(key), value.is_empty())
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No live key.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The flash, to mount it again (after a simulated power cut, say).
    pub fn into_flash(self) -> F {
        self.flash
    }
}

impl<F: NorFlash> KeyValue for FlashKv<F> {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let Some(i) = self.find(key)? else { return Ok(None) };
        let addr = self.index[i].1;
        let mut h = [0u8; HEADER];
        self.flash.read(addr, &mut h)?;
        let mut value = vec![0u8; usize::from(u16::from_le_bytes([h[2], h[3]]))];
        self.flash.read(addr + (HEADER + key.len()) as u32, &mut value)?;
        Ok(Some(value))
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.put(key, value)
    }

    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        if self.find(key)?.is_none() {
            return Ok(());
        }
        self.put(key, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }
}
