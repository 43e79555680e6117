//! A world for the device machine on virtual time: an inverter, a server that
//! speaks protocol v1 (sealing, replay window, long polls, acknowledgements,
//! downloads), power that can be cut at any write, and a shell that carries
//! the machine's actions out with latency and reboots it when asked or when
//! the power goes. Nothing sleeps: time jumps to the next thing due.

use alloc::{string::String, vec, vec::Vec};

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::RefCell;

use ecowatt_core::flashkv::FlashKv;
use ecowatt_core::kv::{KeyValue, KvError, MemoryKv};
use ecowatt_core::machine::{Action, Channel, Device, Event, Failure, Note, Settings};
use ecowatt_core::ota::{FlashError, Slot, Slots};
use ecowatt_core::session::Credentials;
use ecowatt_proto::codec::{self, Sample};
use ecowatt_proto::delivery::Delivery;
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ecowatt_proto::messages::{
    CommandControl, CommandResult, ConfigState, ControlOrders, ControlReport, DELIVERY_ENCRYPTED,
    DeviceCommand, Episode, MessageType, OtaReport, Plan, ScheduleOrders, ScheduleReport,
    SyncRequest, SyncResponse, TelemetryAck, TelemetryUpload, UpdateOffer, signature_algorithm,
};
use ecowatt_proto::modbus::{Exception, ExceptionCode, Request, Response};
use ecowatt_proto::replay::ReplayWindow;
use ecowatt_proto::seal::{self, Direction, Header, Keys};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::doubles::{Flash, Kv, Power};
use crate::flashkv::Nor;

pub const T0: u64 = 1_800_000_000_000;
pub const SECOND: u64 = 1_000;
pub const MINUTE: u64 = 60 * SECOND;
pub const HOUR: u64 = 60 * MINUTE;
const DEVICE_KEY: [u8; 16] = [9; 16];
const SIGNING_KEY: [u8; 32] = [5; 32];
const TARGET: &str = "esp32c3";
/// Round trip to the inverter and to the server.
const INVERTER_MS: u64 = 40;
const SERVER_MS: u64 = 15;

pub type Dev = Device<Kv<SharedKv>, SharedFlash>;

/// Where the device's key-value store lives: memory, or a key-value store
/// on simulated NOR flash (mounted again at every boot: RAM is lost).
pub enum Store {
    Memory(MemoryKv),
    Flash(Option<FlashKv<Nor>>),
}

/// The key-value store's content, shared by the boots that use it.
#[derive(Clone)]
pub struct SharedKv(pub Rc<RefCell<Store>>);

impl Default for SharedKv {
    fn default() -> Self {
        SharedKv(Rc::new(RefCell::new(Store::Memory(MemoryKv::new()))))
    }
}

impl SharedKv {
    /// What a boot finds: the flash store is mounted again from the flash.
    fn remount(&self) {
        if let Store::Flash(f) = &mut *self.0.borrow_mut() {
            let nor = f.take().expect("mounted").into_flash();
            *f = Some(FlashKv::mount(nor).expect("the flash store mounts"));
        }
    }

    fn with<T>(&self, op: impl FnOnce(&mut dyn KeyValue) -> T) -> T {
        match &mut *self.0.borrow_mut() {
            Store::Memory(m) => op(m),
            Store::Flash(f) => op(f.as_mut().expect("mounted")),
        }
    }
}

impl KeyValue for SharedKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.with(|kv| kv.get(key))
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.with(|kv| kv.set(key, value))
    }
    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        self.with(|kv| kv.remove(key))
    }
}

/// The flash, shared by the boots that use it.
pub struct SharedFlash(pub Rc<RefCell<Flash>>);

impl Slots for SharedFlash {
    fn erase(&mut self, slot: Slot) -> Result<(), FlashError> {
        self.0.borrow_mut().erase(slot)
    }
    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        self.0.borrow_mut().write(slot, offset, data)
    }
    fn read(&mut self, slot: Slot, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        self.0.borrow_mut().read(slot, offset, buf)
    }
}

/// The inverter: ten registers, a write log, and a switch for silence.
pub struct Inverter {
    pub regs: [u16; 10],
    pub writes: Vec<(u16, u16)>,
    /// Export-limit writes with their time.
    pub timed: Vec<(u64, u16)>,
    pub silent: bool,
}

impl Inverter {
    fn answer(&mut self, request: &Request) -> ecowatt_core::link::Outcome {
        if self.silent {
            return Err(ecowatt_core::link::TransportError::Timeout);
        }
        match *request {
            Request::ReadHoldingRegisters { start, quantity } => {
                let (s, n) = (start as usize, quantity as usize);
                match self.regs.get(s..s + n) {
                    Some(v) => Ok(Ok(Response::ReadHoldingRegisters(v.to_vec()))),
                    None => {
                        Ok(Err(Exception { function: 3, code: ExceptionCode::IllegalDataAddress }))
                    }
                }
            }
            Request::WriteSingleRegister { address, value } => {
                if address != 8 {
                    return Ok(Err(Exception {
                        function: 6,
                        code: ExceptionCode::IllegalDataAddress,
                    }));
                }
                self.writes.push((address, value));
                self.regs[address as usize] = value.min(100);
                Ok(Ok(Response::WriteSingleRegister { address, value }))
            }
        }
    }
}

/// The server, as the device protocol shows it.
pub struct Server {
    keys: Keys,
    window: ReplayWindow,
    down_counter: u64,
    /// Reachable (an outage when false).
    pub up: bool,
    /// Samples stored, by seq.
    pub stored: BTreeMap<u64, Sample>,
    /// A seq uploaded again with different content (a reused seq: a lost sample).
    pub conflicts: u64,
    /// The config the operator wants.
    pub desired: ConfigState,
    /// What the device last said it runs.
    pub applied: Option<ConfigState>,
    /// Queued commands, and when each was last delivered.
    pub commands: Vec<(DeviceCommand, Option<u64>)>,
    /// Results received, by command id, with how many times each came.
    pub results: BTreeMap<u64, (CommandResult, u32)>,
    /// The update offered, and its image.
    pub offer: Option<(UpdateOffer, Vec<u8>)>,
    /// Update reports received, in order.
    pub reports: Vec<OtaReport>,
    /// The firmware the device said it runs.
    pub firmware: String,
    /// Requests whose counter the window refused.
    pub replays: u64,
    /// Syncs answered.
    pub syncs: u64,
    /// Every upload stored: when, and how many samples.
    pub uploads: Vec<(u64, usize)>,
    /// Image downloads work (`false`: every fetch gets a 503).
    pub downloads: bool,
    /// The fetch that reaches this offset fails once (a cut connection).
    pub cut_fetch_at: Option<u64>,
    /// The offset of every fetch, in order.
    pub fetches: Vec<u64>,
    /// The image served differs from the one signed in this byte.
    pub tamper_at: Option<usize>,
    /// Uploads are refused as stamped by a clock the server cannot believe.
    pub refuse_times: bool,
    /// The next answer to this channel is replaced by these bytes.
    pub garbage: Option<(Channel, Vec<u8>)>,
    /// The fail-safe limit the installer set (a `failsafe` value).
    pub failsafe: Option<u16>,
    /// Leases of queued commands, by id.
    pub leases: BTreeMap<u64, u32>,
    /// Ramp rates of queued commands (hundredths of % per second), by id.
    pub ramps: BTreeMap<u64, u16>,
    /// The control state the device last reported.
    pub control: Option<ControlReport>,
    /// Lease episodes received, each once.
    pub episodes: Vec<Episode>,
    /// The schedule the operator set, compiled (sent while the device runs another version).
    pub plan: Option<Plan>,
    /// Queued commands that return to the schedule.
    pub resume: Vec<u64>,
    /// The schedule state the device last reported.
    pub schedule: Option<ScheduleReport>,
    /// The telemetry codecs the server takes and offers (bit `v` = version `v`).
    pub codecs_offered: u8,
    /// The last sync request stated the device's codecs.
    pub codecs_asked: bool,
    /// The codec of every upload stored, in order.
    pub upload_codecs: Vec<u8>,
    /// The update goes encrypted in chunks of `2^n` bytes to a device that
    /// takes it ([`ecowatt_proto::delivery`]).
    pub encrypt: Option<u8>,
    /// ...under another device's key.
    pub encrypt_for_another: bool,
    /// The last sync request said the device takes encrypted images.
    pub delivery_asked: bool,
}

impl Server {
    fn new() -> Self {
        Server {
            keys: Keys::derive(&DEVICE_KEY),
            window: ReplayWindow { highest: 0, bitmap: 0 },
            down_counter: 0,
            up: true,
            stored: BTreeMap::new(),
            conflicts: 0,
            desired: ConfigState {
                version: 1,
                poll_interval_ms: 5_000,
                upload_interval_ms: 60_000,
                registers: 0x03FF,
            },
            applied: None,
            commands: Vec::new(),
            results: BTreeMap::new(),
            offer: None,
            reports: Vec::new(),
            firmware: String::new(),
            replays: 0,
            syncs: 0,
            uploads: Vec::new(),
            downloads: true,
            cut_fetch_at: None,
            fetches: Vec::new(),
            tamper_at: None,
            refuse_times: false,
            codecs_offered: codec::SUPPORTED,
            codecs_asked: false,
            upload_codecs: Vec::new(),
            encrypt: None,
            encrypt_for_another: false,
            delivery_asked: false,
            garbage: None,
            failsafe: None,
            leases: BTreeMap::new(),
            ramps: BTreeMap::new(),
            control: None,
            episodes: Vec::new(),
            plan: None,
            resume: Vec::new(),
            schedule: None,
        }
    }

    /// Queues a write of the export limit reached at `rate` (hundredths of % per second).
    pub fn ramped(&mut self, id: u64, value: u16, rate: u16) {
        self.command(id, value, u64::MAX);
        self.ramps.insert(id, rate);
    }

    /// Queues a write of the export limit held under a lease of `lease_ms`.
    pub fn leased(&mut self, id: u64, value: u16, lease_ms: u32) {
        self.command(id, value, u64::MAX);
        self.leases.insert(id, lease_ms);
    }

    /// Queues a command to write the export limit.
    pub fn command(&mut self, id: u64, value: u16, expires_ms: u64) {
        let op = ecowatt_proto::messages::Operation::Write { register: 8, value };
        self.commands.push((DeviceCommand { id, op, expires_ms }, None));
    }

    fn open(&mut self, bytes: &[u8]) -> Option<(u64, Vec<u8>)> {
        let (h, body) = seal::open(&self.keys, bytes, None).ok()?;
        if self.window.accept(h.counter).is_err() {
            self.replays += 1;
            return None;
        }
        Some((h.counter, body))
    }

    fn answer(&mut self, answers: u64, msg_type: MessageType, body: &[u8]) -> Vec<u8> {
        self.down_counter += 1;
        let header = Header {
            msg_type: msg_type as u8,
            direction: Direction::Down,
            key_version: 1,
            device_id: 42,
            counter: self.down_counter,
        };
        seal::seal(&self.keys, &header, Some(answers), body)
    }

    /// Something to tell a device that runs `applied`, at `now`.
    fn has_news(&self, now: u64) -> bool {
        self.applied.is_none_or(|a| a.version != self.desired.version)
            || self.commands.iter().any(|(_, at)| at.is_none_or(|t| now >= t + 30 * SECOND))
            || self.failsafe.is_some_and(|f| self.control.as_ref().is_some_and(|c| c.failsafe != f))
            || self.plan_to_send().is_some()
    }

    /// The plan, while the device reports another version.
    fn plan_to_send(&self) -> Option<&Plan> {
        let reported = self.schedule.as_ref()?;
        self.plan.as_ref().filter(|p| p.version != reported.version)
    }

    fn take_sync(&mut self, body: &[u8]) -> Option<SyncRequest> {
        let req = SyncRequest::decode(body).ok()?;
        self.applied = req.applied;
        self.firmware = req.firmware.clone();
        // Like the real server: no offer to a device that runs it (or newer).
        let runs = Version::parse(&req.firmware).ok();
        if self.offer.as_ref().is_some_and(|(o, _)| runs.as_ref() >= Some(&o.manifest.version)) {
            self.offer = None;
        }
        for r in &req.results {
            self.results.entry(r.command_id).or_insert((*r, 0)).1 += 1;
            self.commands.retain(|(c, _)| c.id != r.command_id);
        }
        if let Some(report) = &req.ota {
            if self.reports.last() != Some(report) {
                self.reports.push(report.clone());
            }
        }
        if let Some(c) = &req.control {
            for e in &c.episodes {
                if !self.episodes.contains(e) {
                    self.episodes.push(*e);
                }
            }
            self.control = Some(c.clone());
        }
        if let Some(s) = req.schedule {
            self.schedule = Some(s);
        }
        self.codecs_asked = req.codecs.is_some();
        self.delivery_asked = req.delivery.is_some_and(|d| d & DELIVERY_ENCRYPTED != 0);
        Some(req)
    }

    fn sync_answer(&mut self, counter: u64, now: u64) -> Vec<u8> {
        self.syncs += 1;
        let config = (self.applied.is_none_or(|a| a.version != self.desired.version))
            .then_some(self.desired);
        let mut commands = Vec::new();
        for (c, at) in &mut self.commands {
            if at.is_none_or(|t| now >= t + 30 * SECOND) {
                *at = Some(now);
                commands.push(*c);
            }
        }
        let update = self.offer.as_ref().map(|(o, _)| o.clone());
        // Like the real server: orders only for a device that reports control.
        let control = self.control.as_ref().map(|c| ControlOrders {
            failsafe: self.failsafe.filter(|f| *f != c.failsafe),
            commands: commands
                .iter()
                .filter(|c| self.leases.contains_key(&c.id) || self.ramps.contains_key(&c.id))
                .map(|c| CommandControl {
                    command_id: c.id,
                    lease_ms: self.leases.get(&c.id).copied().unwrap_or(0),
                    ramp_centi_pct_per_s: self.ramps.get(&c.id).copied().unwrap_or(0),
                })
                .collect(),
        });
        // Like the real server: a schedule only for a device that reports one.
        let schedule = self.schedule.as_ref().map(|_| ScheduleOrders {
            plan: self.plan_to_send().cloned(),
            resume: commands.iter().map(|c| c.id).filter(|id| self.resume.contains(id)).collect(),
        });
        // Like the real server: an offer only to a device that states its codecs.
        let codecs = self.codecs_asked.then_some(self.codecs_offered);
        // Like the real server: encrypted only to a device that takes it.
        let delivery = self.encrypt.filter(|_| self.delivery_asked && update.is_some());
        let r = SyncResponse {
            server_time_ms: now,
            config,
            commands,
            update,
            control,
            schedule,
            codecs,
            delivery,
        };
        self.answer(counter, MessageType::SyncResponse, &r.encode())
    }

    fn upload(&mut self, bytes: &[u8], now: u64) -> Result<Vec<u8>, Failure> {
        let refused = || Failure { status: Some(401), message: "unauthorized".into() };
        let (counter, body) = self.open(bytes).ok_or_else(refused)?;
        let up = TelemetryUpload::decode(&body).map_err(|_| refused())?;
        if self.refuse_times {
            let message = r#"{"error":{"code":"sample_time_out_of_range"}}"#.into();
            return Err(Failure { status: Some(422), message });
        }
        if up.codec >= 8 || self.codecs_offered & (1 << up.codec) == 0 {
            let message = r#"{"error":{"code":"codec_not_offered"}}"#.into();
            return Err(Failure { status: Some(422), message });
        }
        let batch = codec::decode(&up.batch).map_err(|_| refused())?;
        self.uploads.push((now, batch.samples.len()));
        self.upload_codecs.push(up.codec);
        let mut last = 0;
        for s in batch.samples {
            last = s.seq;
            match self.stored.get(&s.seq) {
                Some(old) if *old != s => self.conflicts += 1,
                _ => {
                    self.stored.insert(s.seq, s);
                }
            }
        }
        let ack = TelemetryAck { acked_through: last };
        Ok(self.answer(counter, MessageType::TelemetryAck, &ack.encode()))
    }

    /// Offers `image` as `version` (signed by the trusted key unless `forged`).
    pub fn offer_update(&mut self, version: &str, image: Vec<u8>, forged: bool) {
        let manifest = Manifest {
            version: Version::parse(version).unwrap(),
            size: image.len() as u64,
            sha256: Sha256::digest(&image).into(),
            security_counter: 1,
            target: TARGET.into(),
            created_ms: T0,
        };
        let key = if forged { [6; 32] } else { SIGNING_KEY };
        let signature = SigningKey::from_bytes(&key)
            .sign(&manifest.signed_bytes().unwrap())
            .to_bytes()
            .to_vec();
        let offer = UpdateOffer {
            token: [0xAB; 16],
            manifest,
            algorithm: signature_algorithm::ED25519,
            signature,
        };
        self.offer = Some((offer, image));
    }
}

pub fn image(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(7) % 251) as u8).collect()
}

/// An answer on its way to the device.
struct Due {
    at: u64,
    event: Event,
}

/// A sync the server holds open.
struct Held {
    counter: u64,
    until: u64,
}

/// The device, its inverter and server, its power, and the time.
/// A heap's counters (the QEMU suite's counting allocator), to measure the
/// device's memory per chunk of an update.
#[derive(Clone, Copy)]
pub struct Meter {
    /// Bytes live now.
    pub live: fn() -> usize,
    /// The peak of live bytes since the last reset.
    pub peak: fn() -> usize,
    /// Sets the peak to the bytes live now.
    pub reset_peak: fn(),
}

pub struct World {
    pub now: u64,
    pub device: Option<Dev>,
    pub inverter: Inverter,
    pub server: Server,
    pub power: Rc<Power>,
    /// What the key-value store holds (survives reboots and power cuts).
    pub kv: SharedKv,
    /// The image slots (survive reboots and power cuts).
    pub flash: Rc<RefCell<Flash>>,
    pub settings: Settings,
    pub notes: Vec<Note>,
    /// Boots, the first one included.
    pub boots: u32,
    /// Power cuts that took the device down.
    pub cuts: u32,
    due: Vec<Due>,
    held: Option<Held>,
    /// When the device last took in an answer of the server.
    pub last_heard: u64,
    /// Measures the heap around each image chunk the device takes in.
    pub meter: Option<Meter>,
    /// The most heap the device took beyond an image chunk's own bytes.
    pub chunk_heap: usize,
}

pub fn creds() -> Credentials {
    Credentials { device_id: 42, key: DEVICE_KEY, key_version: 1 }
}

pub fn trusted_key() -> PublicKey {
    PublicKey::Ed25519(SigningKey::from_bytes(&SIGNING_KEY).verifying_key().to_bytes())
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    /// A device whose key-value store is on (simulated) NOR flash, 64 sectors
    /// of 4 KiB, with a sample log sized for it.
    pub fn on_flash() -> Self {
        let mut w = World::new();
        w.settings.log_capacity = 240;
        let nor = Nor::new(64, w.power.clone());
        let store = FlashKv::mount(nor).expect("an erased region mounts");
        w.kv = SharedKv(Rc::new(RefCell::new(Store::Flash(Some(store)))));
        w.reboot();
        w.boots = 1;
        w
    }

    pub fn new() -> Self {
        let mut settings = Settings::new(Version::parse("1.0.0").unwrap(), TARGET);
        settings.batch_max = 60;
        settings.chunk = 4_096;
        settings.firmware_keys = vec![trusted_key()];
        let power = Rc::new(Power::default());
        let flash = Flash { power: power.clone(), ..Flash::default() };
        let mut w = World {
            now: T0,
            device: None,
            inverter: Inverter {
                regs: [2300, 50, 2400, 48, 5000, 2310, 30, 450, 100, 1500],
                writes: Vec::new(),
                timed: Vec::new(),
                silent: false,
            },
            server: Server::new(),
            kv: SharedKv::default(),
            flash: Rc::new(RefCell::new(flash)),
            power,
            settings,
            notes: Vec::new(),
            boots: 0,
            cuts: 0,
            due: Vec::new(),
            held: None,
            last_heard: 0,
            meter: None,
            chunk_heap: 0,
        };
        w.boot();
        w
    }

    /// Boots (again) from the stores; a boot the power cuts short is tried
    /// again with the power back.
    fn boot(&mut self) {
        self.due.clear();
        self.held = None;
        loop {
            self.boots += 1;
            self.kv.remount();
            let kv = Kv { inner: self.kv.clone(), power: self.power.clone() };
            match Device::boot(
                kv,
                SharedFlash(self.flash.clone()),
                creds(),
                self.settings.clone(),
                self.now,
            ) {
                Ok(d) => {
                    self.device = Some(d);
                    return;
                }
                Err(e) => {
                    assert!(self.power.is_cut(), "boot failed without a power cut: {e}");
                    self.cuts += 1;
                    self.power.restore();
                    self.now += 2 * SECOND;
                }
            }
        }
    }

    pub fn device(&self) -> &Dev {
        self.device.as_ref().expect("device running")
    }

    /// An export-limit command from the device's own side, now.
    pub fn command_local(
        &mut self,
        percent: u16,
    ) -> Result<u64, ecowatt_core::machine::LocalRefused> {
        let now = self.now;
        self.device.as_mut().expect("device running").command_local(now, percent)
    }

    /// The device restarts (power stays on).
    pub fn reboot(&mut self) {
        self.device = None;
        self.boot();
    }

    /// Runs until `end`.
    pub fn run_until(&mut self, end: u64) {
        loop {
            self.carry_out();
            let next = self.next_time();
            if next > end {
                self.now = self.now.max(end);
                return;
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    /// Runs until `f` holds, for at most `limit` of virtual time.
    pub fn run_until_true(&mut self, limit: u64, mut f: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if f(self) {
                return true;
            }
            let next = (self.now + SECOND).min(end);
            self.run_until(next);
        }
        f(self)
    }

    fn next_time(&self) -> u64 {
        let mut t = self.device().next_wakeup();
        for d in &self.due {
            t = t.min(d.at);
        }
        if let Some(h) = &self.held {
            let now = self.server.has_news(self.now) || !self.server.up;
            t = t.min(if now { self.now } else { h.until });
        }
        t
    }

    /// Delivers what is due now, or just the time.
    fn step(&mut self) {
        if self.held.is_some() && !self.server.up {
            // An outage cuts the long poll held open.
            self.held = None;
            let answer = Err(Failure::unreachable("connection reset"));
            self.due.push(Due {
                at: self.now,
                event: Event::Server { channel: Channel::Sync, answer },
            });
        }
        if let Some(h) = &self.held {
            if self.now >= h.until || self.server.has_news(self.now) {
                let counter = h.counter;
                self.held = None;
                let answer = self.server.sync_answer(counter, self.now);
                self.due.push(Due {
                    at: self.now + SERVER_MS,
                    event: Event::Server { channel: Channel::Sync, answer: Ok(answer) },
                });
            }
        }
        let event = match self.due.iter().position(|d| d.at <= self.now) {
            Some(i) => self.due.remove(i).event,
            None => Event::Tick,
        };
        if matches!(&event, Event::Server { answer: Ok(_), .. }) {
            self.last_heard = self.now;
        }
        let chunk = matches!(&event, Event::Chunk(Ok(_)));
        let meter = self.meter.filter(|_| chunk).map(|m| (m, (m.live)()));
        if let Some((m, _)) = meter {
            (m.reset_peak)();
        }
        self.device.as_mut().expect("device").handle(self.now, event);
        if let Some((m, before)) = meter {
            // The answer's bytes were live before; what the device took beyond them.
            self.chunk_heap = self.chunk_heap.max((m.peak)().saturating_sub(before));
        }
        if self.power.is_cut() {
            // The device died at the write that failed: nothing it asked for
            // in this step happened. Power comes back a little later.
            while self.device.as_mut().expect("device").poll_action().is_some() {}
            self.cuts += 1;
            self.power.restore();
            self.now += 2 * SECOND;
            self.reboot();
        }
    }

    /// Carries out every action the device asked for.
    fn carry_out(&mut self) {
        while let Some(action) = self.device.as_mut().expect("device").poll_action() {
            match action {
                Action::Note(n) => self.notes.push(n),
                Action::Inverter { request, .. } => {
                    if let Request::WriteSingleRegister { value, .. } = request {
                        if !self.inverter.silent {
                            self.inverter.timed.push((self.now, value));
                        }
                    }
                    let outcome = self.inverter.answer(&request);
                    self.due
                        .push(Due { at: self.now + INVERTER_MS, event: Event::Inverter(outcome) });
                }
                Action::Post { channel, body, timeout_ms } => self.post(channel, body, timeout_ms),
                Action::Fetch { offset, len, .. } => {
                    self.server.fetches.push(offset);
                    let end = offset + u64::from(len);
                    let cut = self.server.cut_fetch_at.take_if(|c| (offset..end).contains(c));
                    let answer = match (&self.server.offer, self.server.up) {
                        (Some(_), true) if cut.is_some() => {
                            Err(Failure::unreachable("connection reset"))
                        }
                        (Some(_), true) if !self.server.downloads => {
                            Err(Failure { status: Some(503), message: "busy".into() })
                        }
                        (Some((offer, img)), true) => {
                            let delivery =
                                self.server.encrypt.filter(|_| self.server.delivery_asked);
                            let stream = delivery.map(|log2| {
                                let key = if self.server.encrypt_for_another {
                                    [0x77; 16]
                                } else {
                                    DEVICE_KEY
                                };
                                Delivery::new(&key, &offer.token, log2, img.len() as u64)
                            });
                            let mut bytes = match stream {
                                None => {
                                    let end = (offset as usize + len as usize).min(img.len());
                                    img[offset as usize..end].to_vec()
                                }
                                Some(d) => {
                                    let last = (offset + u64::from(len)).min(d.stream_len()) - 1;
                                    d.stream_range(img, offset, last)
                                }
                            };
                            let end = offset as usize + bytes.len();
                            if let Some(t) = self.server.tamper_at {
                                if (offset as usize..end).contains(&t) {
                                    bytes[t - offset as usize] ^= 1;
                                }
                            }
                            Ok(bytes)
                        }
                        (None, true) => {
                            Err(Failure { status: Some(404), message: "no offer".into() })
                        }
                        (_, false) => Err(Failure::unreachable("connection refused")),
                    };
                    self.due.push(Due { at: self.now + SERVER_MS, event: Event::Chunk(answer) });
                }
                Action::Restart => {
                    self.reboot();
                    return;
                }
            }
        }
    }

    fn post(&mut self, channel: Channel, body: Vec<u8>, timeout_ms: u64) {
        let at = self.now + SERVER_MS;
        if !self.server.up {
            let answer = Err(Failure::unreachable("connection refused"));
            self.due.push(Due { at, event: Event::Server { channel, answer } });
            return;
        }
        if let Some((c, bytes)) = self.server.garbage.take_if(|(c, _)| *c == channel) {
            let _ = c;
            self.due.push(Due { at, event: Event::Server { channel, answer: Ok(bytes) } });
            return;
        }
        let answer = match channel {
            Channel::Upload => self.server.upload(&body, self.now),
            Channel::Sync => {
                let Some((counter, req)) = self.server.open(&body) else {
                    let answer = Err(Failure { status: Some(401), message: "unauthorized".into() });
                    self.due.push(Due { at, event: Event::Server { channel, answer } });
                    return;
                };
                let Some(req) = self.server.take_sync(&req) else {
                    let answer = Err(Failure { status: Some(400), message: "bad request".into() });
                    self.due.push(Due { at, event: Event::Server { channel, answer } });
                    return;
                };
                let wait = u64::from(req.wait_ms).min(timeout_ms);
                self.held = Some(Held { counter, until: self.now + wait });
                return;
            }
        };
        self.due.push(Due { at, event: Event::Server { channel, answer } });
    }

    /// Every sample seq the server holds, checked to be 1..=n without gaps.
    pub fn stored_contiguous(&self) -> u64 {
        let seqs: Vec<u64> = self.server.stored.keys().copied().collect();
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + seqs[0]),
            "no gap in what the server stored"
        );
        seqs.len() as u64
    }

    /// Notes matching `f`.
    pub fn count(&self, f: impl Fn(&Note) -> bool) -> usize {
        self.notes.iter().filter(|n| f(n)).count()
    }
}
