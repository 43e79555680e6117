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

use embedded_alloc::LlffHeap as Heap;

#[global_allocator]
static HEAP: Heap = Heap::empty();

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
    exit(true)
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
