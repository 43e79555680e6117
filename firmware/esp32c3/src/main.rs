//! EcoWatt device firmware for the ESP32-C3.
//!
//! The device is the core's machine (`ecowatt_core::machine::Device`), the
//! same one the Linux agent drives; this program adds only drivers:
//! - provisioning from its own flash partition (`provision`),
//!   written by `ecowatt device provision-image`, never compiled in;
//! - Wi-Fi (esp-radio) and TCP/IP (embassy-net, DHCP) for the device
//!   protocol's HTTP ([`http`]);
//! - Modbus RTU on UART1 through an RS485 transceiver ([`rs485`]);
//! - flash partitions as the core's `NorFlash`: the key-value store on
//!   `ewkv` (the core's `FlashKv`), the OTA slots `ota_0`/`ota_1` (the core's
//!   `FlashSlots`), and `otadata` following the core's boot decision ([`storage`]);
//! - the clock: uptime until the first sync, then the server's time.
//!
//! Wiring and flashing: `docs/firmware-esp32c3.md`.
#![no_std]
#![no_main]

extern crate alloc;

mod http;
mod rs485;
mod storage;

use alloc::rc::Rc;
use core::cell::RefCell;

use ecowatt_core::flashkv::FlashKv;
use ecowatt_core::flashslots::FlashSlots;
use ecowatt_core::http1::Origin;
use ecowatt_core::machine::{Action, Channel, Device, Event, Note, Settings};
use ecowatt_core::provision::Provision;
use ecowatt_proto::firmware::Version;
use embassy_executor::Spawner;
use embassy_futures::select::{Either, select};
use embassy_net::{Runner, StackResources};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::channel::Channel as Queue;
use embassy_time::{Duration, Instant, Timer};
use esp_backtrace as _;
use esp_hal::clock::CpuClock;
use esp_hal::gpio::{Level, Output, OutputConfig};
use esp_hal::interrupt::software::SoftwareInterruptControl;
use esp_hal::rng::Rng;
use esp_hal::timer::timg::TimerGroup;
use esp_hal::uart::{Config as UartConfig, Uart};
use esp_println::println;
use esp_radio::wifi::{Config, ControllerConfig, Interface, WifiController, sta::StationConfig};
use static_cell::StaticCell;

esp_bootloader_esp_idf::esp_app_desc!();

/// Samples kept while the server is unreachable: 1 h at 5 s (RAM holds them too).
const LOG_CAPACITY: u64 = 720;
/// Image bytes per fetch.
const CHUNK: u32 = 4096;
/// This build's hardware target, as firmware manifests name it.
const TARGET: &str = "esp32c3";

type Requests = Queue<CriticalSectionRawMutex, Action, 1>;
type Answers = Queue<CriticalSectionRawMutex, Event, 4>;

static SYNC_REQUESTS: StaticCell<Requests> = StaticCell::new();
static OTHER_REQUESTS: StaticCell<Requests> = StaticCell::new();
static ANSWERS: StaticCell<Answers> = StaticCell::new();
static NET_RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 72 * 1024);
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    let sw_int = SoftwareInterruptControl::new(peripherals.SW_INTERRUPT);
    esp_rtos::start(timg0.timer0, sw_int.software_interrupt0);
    println!("ecowatt {} starting", env!("CARGO_PKG_VERSION"));

    let flash: storage::Flash =
        Rc::new(RefCell::new(esp_storage::FlashStorage::new(peripherals.FLASH)));
    let layout = match storage::layout(&flash) {
        Ok(l) => l,
        Err(e) => halt(&e).await,
    };
    let provision =
        match storage::read(&flash, layout.provision, ecowatt_core::provision::MAX_LEN as u32)
            .and_then(|b| Provision::decode(&b).map_err(|e| alloc::format!("{e}")))
        {
            Ok(p) => p,
            Err(e) => halt(&alloc::format!("provisioning: {e}")).await,
        };
    println!("device {} (id {})", provision.device, provision.creds.device_id);
    let origin = match Origin::parse(&provision.server) {
        Ok(o) => o,
        Err(e) => halt(&alloc::format!("server {}: {e}", provision.server)).await,
    };

    // The device machine on its flash stores.
    let kv = match FlashKv::mount(storage::Region::new(flash.clone(), layout.kv)) {
        Ok(kv) => kv,
        Err(e) => halt(&alloc::format!("key-value store: {e}")).await,
    };
    let slots = FlashSlots::new(
        storage::Region::new(flash.clone(), layout.slots[0]),
        storage::Region::new(flash.clone(), layout.slots[1]),
    );
    let factory = Version::parse(env!("CARGO_PKG_VERSION")).expect("the crate's version");
    let mut settings = Settings::new(factory, TARGET);
    settings.log_capacity = LOG_CAPACITY;
    settings.batch_max = 60;
    settings.chunk = CHUNK;
    settings.firmware_keys = provision.firmware_keys.clone();
    let mut clock = Clock::default();
    let mut device = match Device::boot(kv, slots, provision.creds.clone(), settings, clock.now()) {
        Ok(d) => d,
        Err(e) => halt(&alloc::format!("boot: {e}")).await,
    };
    let booted = device.booted().clone();
    println!("firmware {} in slot {:?}, trial {}", booted.running, booted.slot, booted.trial);
    // The bootloader follows otadata; otadata follows the core's decision.
    if layout.running.is_some_and(|r| r != booted.slot) {
        match storage::select(&flash, booted.slot) {
            Ok(_) => esp_hal::system::software_reset(),
            Err(e) => println!("cannot select slot {:?}: {e}", booted.slot),
        }
    }

    // Wi-Fi and the network stack.
    let station = Config::Station(
        StationConfig::default()
            .with_ssid(provision.wifi_ssid.as_str())
            .with_password(provision.wifi_password.as_str().into()),
    );
    let (controller, interfaces) = match esp_radio::wifi::new(
        peripherals.WIFI,
        ControllerConfig::default().with_initial_config(station),
    ) {
        Ok(w) => w,
        Err(e) => halt(&alloc::format!("Wi-Fi: {e:?}")).await,
    };
    let rng = Rng::new();
    let seed = u64::from(rng.random()) << 32 | u64::from(rng.random());
    let (stack, runner) = embassy_net::new(
        interfaces.station,
        embassy_net::Config::dhcpv4(Default::default()),
        NET_RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(wifi_task(controller).expect("one Wi-Fi task"));
    spawner.spawn(net_task(runner).expect("one network task"));

    // The inverter.
    let uart = match Uart::new(peripherals.UART1, UartConfig::default().with_baudrate(9_600)) {
        Ok(u) => u.with_tx(peripherals.GPIO4).with_rx(peripherals.GPIO5).into_async(),
        Err(e) => halt(&alloc::format!("UART: {e:?}")).await,
    };
    let driver_enable = Output::new(peripherals.GPIO6, Level::Low, OutputConfig::default());
    let mut inverter = rs485::Rs485::new(uart, driver_enable);

    // Two HTTP workers: the long poll, and uploads and image fetches.
    let sync_requests: &'static Requests = SYNC_REQUESTS.init(Queue::new());
    let other_requests: &'static Requests = OTHER_REQUESTS.init(Queue::new());
    let answers: &'static Answers = ANSWERS.init(Queue::new());
    let http = http::Http::new(stack, origin.clone());
    spawner.spawn(http_task(http, sync_requests, answers).expect("sync worker"));
    spawner.spawn(
        http_task(http::Http::new(stack, origin), other_requests, answers).expect("upload worker"),
    );
    stack.wait_config_up().await;
    println!("network up");

    loop {
        while let Some(action) = device.poll_action() {
            match action {
                Action::Inverter { slave, request } => {
                    let outcome = inverter.execute(slave, request).await;
                    device.handle(clock.now(), Event::Inverter(outcome));
                }
                Action::Restart => {
                    // After an install the other slot holds the new image; after
                    // a failed trial it holds the old one. Either way the next
                    // boot runs it, and the core's boot decision checks it.
                    if let Err(e) = storage::select(&flash, device.booted().slot.other()) {
                        println!("cannot select the other slot: {e}");
                    }
                    Timer::after(Duration::from_millis(100)).await;
                    esp_hal::system::software_reset();
                }
                Action::Note(note) => {
                    if let Note::ServerTime(ms) = note {
                        clock.set(ms);
                    }
                    log(&note);
                }
                action @ Action::Post { channel: Channel::Sync, .. } => {
                    sync_requests.send(action).await
                }
                action => other_requests.send(action).await,
            }
        }
        let wait = device.next_wakeup().saturating_sub(clock.now()).min(60_000);
        let event = match select(answers.receive(), Timer::after(Duration::from_millis(wait))).await
        {
            Either::First(event) => event,
            Either::Second(()) => Event::Tick,
        };
        device.handle(clock.now(), event);
    }
}

/// Wall time: uptime until the server's time is known, then uptime plus the
/// offset, never going back.
#[derive(Default)]
struct Clock {
    offset: Option<u64>,
    last: u64,
}

impl Clock {
    fn now(&mut self) -> u64 {
        let t = Instant::now().as_millis() + self.offset.unwrap_or(0);
        self.last = self.last.max(t);
        self.last
    }

    fn set(&mut self, server_ms: u64) {
        let uptime = Instant::now().as_millis();
        let drift = (uptime + self.offset.unwrap_or(0)).abs_diff(server_ms);
        if self.offset.is_none() || drift > 2_000 {
            self.offset = Some(server_ms.saturating_sub(uptime));
        }
    }
}

fn log(note: &Note) {
    match note {
        Note::Sampled { .. } | Note::ServerTime(_) => {}
        note => println!("{note:?}"),
    }
}

/// A device that cannot start says why on the console, forever.
async fn halt(why: &str) -> ! {
    loop {
        println!("cannot start: {why}");
        Timer::after(Duration::from_secs(10)).await;
    }
}

#[embassy_executor::task(pool_size = 2)]
async fn http_task(mut http: http::Http, requests: &'static Requests, answers: &'static Answers) {
    loop {
        let action = requests.receive().await;
        if let Some(event) = http.carry(&action).await {
            answers.send(event).await;
        }
    }
}

#[embassy_executor::task]
async fn wifi_task(mut controller: WifiController<'static>) {
    loop {
        match controller.connect_async().await {
            Ok(_) => {
                println!("Wi-Fi connected");
                let _ = controller.wait_for_disconnect_async().await;
                println!("Wi-Fi disconnected");
            }
            Err(e) => println!("Wi-Fi: {e:?}"),
        }
        Timer::after(Duration::from_secs(5)).await;
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Interface<'static>>) {
    runner.run().await
}
