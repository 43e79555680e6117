//! The key-value store on NOR flash, against a simulated NOR flash with the
//! real rules (erase before write, sector erase, word-aligned writes, a write
//! only clears bits) and power cuts that leave a partly written word or a
//! partly erased sector.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ecowatt_core::flashkv::{FlashKv, NorFlash};
use ecowatt_core::kv::{KeyValue, KvError};

use crate::doubles::Power;

/// ESP32-C3 flash: 4-byte words, 4 KiB sectors.
pub const SECTOR: usize = 4096;

/// A NOR flash region on a power supply: each write or erase is one use of
/// the supply; the one the power goes in is left half done.
pub struct Nor {
    pub bytes: Vec<u8>,
    pub power: Rc<Power>,
    /// Pseudo-random state for how much of a cut operation happened.
    seed: u32,
}

impl Nor {
    pub fn new(sectors: usize, power: Rc<Power>) -> Self {
        Nor { bytes: vec![0xFF; sectors * SECTOR], power, seed: 0x1234_5678 }
    }

    fn random(&mut self) -> u32 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 17;
        self.seed ^= self.seed << 5;
        self.seed
    }
}

impl NorFlash for Nor {
    const WORD: usize = 4;
    const SECTOR: usize = SECTOR;

    fn sectors(&self) -> u32 {
        (self.bytes.len() / SECTOR) as u32
    }

    fn read(&mut self, addr: u32, buf: &mut [u8]) -> Result<(), KvError> {
        let a = addr as usize;
        buf.copy_from_slice(&self.bytes[a..a + buf.len()]);
        Ok(())
    }

    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), KvError> {
        let a = addr as usize;
        assert!(a % 4 == 0 && data.len() % 4 == 0, "unaligned write at {a} of {}", data.len());
        assert!(a / SECTOR == (a + data.len() - 1) / SECTOR, "a write across sectors at {a}");
        for (i, b) in data.iter().enumerate() {
            let old = self.bytes[a + i];
            assert_eq!(old & b, *b, "byte {} programmed again without an erase", a + i);
        }
        if self.power.tick().is_err() {
            // Some words programmed, one partly (some of its bits), none after.
            let words = data.len() / 4;
            let done = self.random() as usize % (words + 1);
            for (byte, b) in self.bytes[a..a + done * 4].iter_mut().zip(data) {
                *byte &= b;
            }
            if done < words {
                let mask = self.random().to_le_bytes();
                for k in 0..4 {
                    self.bytes[a + done * 4 + k] &= data[done * 4 + k] | mask[k];
                }
            }
            return Err(KvError("power cut".into()));
        }
        for (i, b) in data.iter().enumerate() {
            self.bytes[a + i] &= b;
        }
        Ok(())
    }

    fn erase(&mut self, index: u32) -> Result<(), KvError> {
        let a = index as usize * SECTOR;
        if self.power.tick().is_err() {
            // Part of the sector erased, the rest as it was.
            let done = self.random() as usize % (SECTOR / 4);
            self.bytes[a..a + done * 4].fill(0xFF);
            return Err(KvError("power cut".into()));
        }
        self.bytes[a..a + SECTOR].fill(0xFF);
        Ok(())
    }
}

fn mount(nor: Nor) -> FlashKv<Nor> {
    FlashKv::mount(nor).unwrap_or_else(|e| panic!("mount: {e}"))
}

/// What a device writes: sample slots going round, a counter block, a
/// journal that grows to 2 KiB, a config now and then.
fn workload(step: u64) -> (String, Vec<u8>) {
    match step % 10 {
        0 => (String::from("proto.counter"), (step * 64).to_be_bytes().to_vec()),
        1 => (
            String::from("cmd.journal"),
            vec![(step % 251) as u8; 40 + (step as usize * 37) % 2_000],
        ),
        2 if step % 50 == 2 => (String::from("cfg"), vec![7; 30]),
        3 if step % 30 == 3 => (String::from("log.acked"), (step / 2).to_be_bytes().to_vec()),
        _ => {
            let slot = step % 120;
            (format!("log.s.{slot}"), [step.to_be_bytes().to_vec(), vec![0x55; 20]].concat())
        }
    }
}

pub fn flashkv_keeps_the_newest_value_across_remounts_and_compactions() {
    let power = Rc::new(Power::default());
    let mut kv = mount(Nor::new(8, power.clone()));
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for step in 0..3_000u64 {
        let (key, value) = workload(step);
        kv.set(&key, &value).unwrap();
        model.insert(key, value);
        if step % 500 == 499 {
            kv.remove("cfg").unwrap();
            model.remove("cfg");
            kv = mount(kv.into_flash());
        }
    }
    assert!(power.writes() > 3_000, "compactions happened ({} flash operations)", power.writes());
    for (k, v) in &model {
        assert_eq!(kv.get(k).unwrap().as_ref(), Some(v), "{k}");
    }
    assert_eq!(kv.get("cfg").unwrap(), None, "removed");
    assert_eq!(kv.len(), model.len());
    let mut again = mount(kv.into_flash());
    for (k, v) in &model {
        assert_eq!(again.get(k).unwrap().as_ref(), Some(v), "{k} after a remount");
    }
}

pub fn flashkv_survives_a_power_cut_at_every_flash_operation() {
    // One clean run counts the operations; then the power goes at each.
    const STEPS: u64 = 400;
    let run = |cut: Option<usize>| {
        let power = Rc::new(Power::default());
        let mut kv = mount(Nor::new(4, power.clone()));
        if let Some(n) = cut {
            power.cut_after(n);
        }
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut counter = 0u64;
        let mut cuts = 0;
        let mut step = 0;
        while step < STEPS {
            let (key, value) = workload(step);
            match kv.set(&key, &value) {
                Ok(()) => {
                    model.insert(key.clone(), value.clone());
                    if key == "proto.counter" {
                        counter = step * 64;
                    }
                    step += 1;
                }
                Err(_) => {
                    // Power back: mount again; the write that was cut left
                    // the old value or the new one, nothing else changed.
                    cuts += 1;
                    power.restore();
                    kv = mount(kv.into_flash());
                    let now = kv.get(&key).unwrap();
                    assert!(
                        now.as_ref() == model.get(&key) || now.as_ref() == Some(&value),
                        "cut at {cut:?}: {key} is neither the old nor the new value"
                    );
                    if let Some(v) = now {
                        model.insert(key.clone(), v);
                    }
                    step += 1;
                }
            }
            if cuts > 0 {
                for (k, v) in &model {
                    assert_eq!(kv.get(k).unwrap().as_ref(), Some(v), "cut at {cut:?}: {k}");
                }
                let c = kv
                    .get("proto.counter")
                    .unwrap()
                    .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                assert!(c.unwrap_or(0) >= counter, "cut at {cut:?}: the counter went back");
                cuts = 0;
            }
        }
        // Everything written after the cut is found again too.
        let mut kv = mount(kv.into_flash());
        for (k, v) in &model {
            assert_eq!(kv.get(k).unwrap().as_ref(), Some(v), "cut at {cut:?}, at the end: {k}");
        }
        (power.writes(), model)
    };
    let (ops, _) = run(None);
    assert!(ops > 500, "the workload compacts ({ops} flash operations)");
    for n in 0..ops {
        run(Some(n));
    }
}

pub fn flashkv_says_when_it_is_full_and_keeps_what_it_has() {
    let power = Rc::new(Power::default());
    let mut kv = mount(Nor::new(3, power));
    let mut stored = 0;
    let full = loop {
        match kv.set(&format!("k{stored}"), &[stored as u8; 200]) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1_000, "never full");
    };
    assert!(full.0.contains("full"), "{full}");
    assert!(stored >= 20, "two sectors' worth of values ({stored})");
    let mut kv = mount(kv.into_flash());
    for i in 0..stored {
        assert_eq!(kv.get(&format!("k{i}")).unwrap(), Some(vec![i as u8; 200]), "k{i}");
    }
    for i in 0..stored / 2 {
        kv.remove(&format!("k{i}")).unwrap();
    }
    kv.set("after", b"space came back").unwrap();
    assert_eq!(kv.get("after").unwrap().as_deref(), Some(&b"space came back"[..]));
}

pub fn flashkv_refuses_what_cannot_fit_and_reads_an_erased_region_as_empty() {
    let power = Rc::new(Power::default());
    let mut kv = mount(Nor::new(4, power));
    assert!(kv.is_empty());
    assert!(kv.set("big", &vec![1; SECTOR]).is_err());
    assert!(kv.set("", b"x").is_err());
    kv.set("k", &vec![2; 3_000]).unwrap();
    let mut garbage = kv.into_flash();
    // A region of random bytes (another layout, a damaged chip) mounts as
    // what it can prove, and takes writes.
    for (i, b) in garbage.bytes.iter_mut().enumerate().skip(SECTOR) {
        *b &= (i * 7 % 256) as u8;
    }
    let mut kv = FlashKv::mount(garbage).expect("mounts");
    kv.set("new", b"ok").unwrap();
    assert_eq!(kv.get("new").unwrap().as_deref(), Some(&b"ok"[..]));
}
