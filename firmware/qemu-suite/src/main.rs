//! The device core's suite on the ESP32-C3's instruction set: a bare-metal
//! program for `riscv32imc-unknown-none-elf` that runs every check of
//! `ecowatt-core-suite` in turn on the QEMU `virt` board, prints through
//! semihosting, and exits 0 when all pass, 1 at the first failure (the panic
//! handler prints which and why). `cargo run --release` in `firmware/` runs it
//! (the runner is set in `firmware/.cargo/config.toml`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt::Write;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;

use embedded_alloc::LlffHeap as Heap;

static HEAP: Heap = Heap::empty();

/// The heap, counting the bytes live and their peak (for the codec's
/// memory check). One hart, no interrupts: plain cells suffice.
struct Counted {
    live: Cell<usize>,
    peak: Cell<usize>,
}

// SAFETY: one hart and no interrupts (see `SingleHartNoInterrupts`): the
// cells are never touched concurrently.
unsafe impl Sync for Counted {}

// SAFETY: every call is passed on to the heap unchanged; only counts are added.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { HEAP.alloc(layout) };
        if !p.is_null() {
            self.live.set(self.live.get() + layout.size());
            self.peak.set(self.peak.get().max(self.live.get()));
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { HEAP.dealloc(ptr, layout) };
        self.live.set(self.live.get() - layout.size());
    }
}

#[global_allocator]
static COUNTED: Counted = Counted { live: Cell::new(0), peak: Cell::new(0) };

/// Bytes kept for the stack, below the top of RAM.
const STACK: usize = 4 * 1024 * 1024;

core::arch::global_asm!(
    r#"
    .section .text.start, "ax"
    .global _start
_start:
    .option push
    .option norelax
    la gp, __global_pointer$
    .option pop
    la sp, _stack_top
    la t0, _sbss
    la t1, _ebss
1:  bgeu t0, t1, 2f
    sw zero, 0(t0)
    addi t0, t0, 4
    j 1b
2:  call {main}
3:  j 3b
"#,
    main = sym main,
);

/// A semihosting call: operation `op` with `arg`.
fn semihost(op: usize, arg: usize) -> usize {
    let mut a0 = op;
    // SAFETY: the RISC-V semihosting sequence (uncompressed slli/ebreak/srai);
    // QEMU's semihosting reads `a1` as the argument and returns in `a0`.
    unsafe {
        core::arch::asm!(
            ".option push",
            ".option norvc",
            "slli zero, zero, 0x1f",
            "ebreak",
            "srai zero, zero, 0x7",
            ".option pop",
            inout("a0") a0,
            in("a1") arg,
            options(nostack),
        );
    }
    a0
}

const SYS_WRITE0: usize = 0x04;
const SYS_EXIT: usize = 0x18;
const ADP_STOPPED_APPLICATION_EXIT: usize = 0x20026;
const ADP_STOPPED_RUNTIME_ERROR_UNKNOWN: usize = 0x20023;

/// Writes to the host's console.
struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let mut z: Vec<u8> = Vec::with_capacity(s.len() + 1);
        z.extend_from_slice(s.as_bytes());
        z.push(0);
        semihost(SYS_WRITE0, z.as_ptr() as usize);
        Ok(())
    }
}

fn exit(ok: bool) -> ! {
    let reason = if ok { ADP_STOPPED_APPLICATION_EXIT } else { ADP_STOPPED_RUNTIME_ERROR_UNKNOWN };
    semihost(SYS_EXIT, reason);
    // Not reached: QEMU has exited. Wait for interrupts that never come.
    loop {
        // SAFETY: `wfi` only pauses the hart.
        unsafe { core::arch::asm!("wfi") };
    }
}

unsafe extern "C" {
    static _heap_start: u8;
    static _stack_top: u8;
}

extern "C" fn main() -> ! {
    // SAFETY: the linker script places the heap between the end of .bss and
    // the stack; only this allocator uses that memory, initialised once here.
    unsafe {
        let start = &raw const _heap_start as usize;
        let top = &raw const _stack_top as usize;
        HEAP.init(start, top - STACK - start);
    }
    let suite = ecowatt_core_suite::SUITE;
    let _ = writeln!(Console, "running {} checks on riscv32imc (QEMU virt)", suite.len());
    for (name, check) in suite {
        let _ = write!(Console, "check {name} ... ");
        check();
        let _ = writeln!(Console, "ok");
    }
    let _ = writeln!(Console, "suite result: ok. {} passed; 0 failed", suite.len());
    codec_memory();
    update_memory();
    exit(true)
}

/// Bytes of stack below the caller's that `f` touched: the region below the
/// stack pointer is painted first, and the deepest changed byte found after.
#[inline(never)]
fn stack_used(f: impl FnOnce()) -> usize {
    const PAINTED: usize = 64 * 1024;
    const PAINT: u8 = 0xA5;
    let sp: usize;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mv {}, sp", out(reg) sp) };
    // A margin for this function's own frame and the call into `f`.
    let top = sp - 256;
    let bottom = top - PAINTED;
    // SAFETY: the stack is 4 MiB (`STACK`); the painted 64 KiB below the
    // current frame is free stack that nothing else uses.
    unsafe { core::ptr::write_bytes(bottom as *mut u8, PAINT, PAINTED) };
    f();
    // SAFETY: the same region, read back.
    let untouched = (bottom..top)
        .take_while(|a| unsafe { core::ptr::read_volatile(*a as *const u8) } == PAINT)
        .count();
    PAINTED - untouched
}

/// The v2 encoder's working memory on this instruction set: its stack and
/// its heap besides the output, for batches of 60, 720 and 4,096 samples of
/// ten registers (noisy, so every block model is weighed). The stack must not
/// grow with the batch (within 128 B: the allocator's own path varies with
/// the size it is asked for), and the only heap is the output buffer.
fn codec_memory() {
    use ecowatt_proto::codec::{CODEC_V2, Sample, encode_as};
    let mut stacks = Vec::new();
    for n in [60usize, 720, 4096] {
        let samples: Vec<Sample> = (0..n as u64)
            .map(|i| Sample {
                seq: i + 1,
                unix_ms: 1_800_000_000_000 + 5_000 * i + (i * 37) % 50,
                values: (0..10u64)
                    .map(|r| (2_000 + r * 300 + (i * (r + 3) * 7919) % 97) as u16)
                    .collect(),
            })
            .collect();
        let before = COUNTED.live.get();
        COUNTED.peak.set(before);
        let mut out = Vec::new();
        let stack = stack_used(|| out = encode_as(CODEC_V2, 0x03FF, &samples).unwrap());
        let heap = COUNTED.peak.get() - before;
        let _ = writeln!(
            Console,
            "codec v2 encoder, {n} samples: stack {stack} B, heap peak {heap} B = the output buffer ({} B reserved, {} B used)",
            out.capacity(),
            out.len()
        );
        assert_eq!(heap, out.capacity(), "the encoder allocates only its output");
        stacks.push(stack);
    }
    let (least, most) = (stacks.iter().min().unwrap(), stacks.iter().max().unwrap());
    assert!(most - least <= 128, "the encoder's stack grows with the batch: {stacks:?}");
}

/// The device's update path on this instruction set: an encrypted update of
/// 16 KiB and of 256 KiB, each chunk decrypted in the fetch's own buffer.
/// Beyond the bytes of the answer it is handed, the device must take the
/// same heap for a chunk of either image (within 256 B), and each fetch asks
/// for at most its chunk setting or one encrypted chunk. The slots are sized
/// before (a flash partition does not grow).
fn update_memory() {
    use ecowatt_core_suite::world::{Meter, World, image};
    fn live() -> usize {
        COUNTED.live.get()
    }
    fn peak() -> usize {
        COUNTED.peak.get()
    }
    fn reset_peak() {
        COUNTED.peak.set(COUNTED.live.get());
    }
    let mut heaps = Vec::new();
    for len in [16 * 1024usize, 256 * 1024] {
        let mut w = World::new();
        w.server.encrypt = Some(12);
        for slot in &mut w.flash.borrow_mut().slots {
            slot.reserve_exact(len);
        }
        w.meter = Some(Meter { live, peak, reset_peak });
        w.server.offer_update("1.1.0", image(len), false);
        let installed = |w: &World| {
            w.server
                .reports
                .iter()
                .any(|r| r.state == ecowatt_proto::messages::OtaState::Installing)
        };
        assert!(
            w.run_until_true(60 * 60 * 1000, installed),
            "installed: {:?}",
            w.server.reports.last()
        );
        let f = &w.server.fetches;
        let widest = f.windows(2).map(|p| p[1] - p[0]).max().unwrap_or(0);
        assert!(widest <= 4_096 + 16, "a fetch of {widest} B");
        let _ = writeln!(
            Console,
            "encrypted update of {} KiB: {} fetches, {widest} B apart, heap per chunk beyond its bytes {} B",
            len / 1024,
            f.len(),
            w.chunk_heap
        );
        heaps.push(w.chunk_heap);
    }
    assert!(heaps[1] <= heaps[0] + 256, "the update path's heap grows with the image: {heaps:?}");
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Console, "FAILED\n{info}");
    exit(false)
}

/// One hart, and no interrupt is ever enabled: a critical section has
/// nothing to exclude.
struct SingleHartNoInterrupts;
critical_section::set_impl!(SingleHartNoInterrupts);

// SAFETY: see above; nothing runs concurrently with the suite.
// (The restore state's type follows the features other crates of this
// workspace enable; there is nothing to restore either way.)
unsafe impl critical_section::Impl for SingleHartNoInterrupts {
    unsafe fn acquire() -> critical_section::RawRestoreState {
        Default::default()
    }
    unsafe fn release(_: critical_section::RawRestoreState) {}
}
