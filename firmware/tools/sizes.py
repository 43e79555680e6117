#!/usr/bin/env python3
"""Sizes of an ESP32-C3 firmware build: the app image (what goes into an OTA
slot) and the static RAM: what the linker placed in the chip's SRAM for good
(.data, .bss with the heap declared there, code run from RAM: .rwtext, .trap).
Not counted: the stack (whatever RAM is left), .rwdata_dummy (the data bus's
view of the RAM code, already counted), and .dram2_uninit (the second-stage
bootloader's RAM, reclaimed as heap after boot). Fails above the limits.

usage: sizes.py ELF APP_IMAGE --max-app BYTES --max-ram BYTES
"""
import argparse
import os
import struct
import sys

# ESP32-C3 SRAM as the CPU sees it: through the instruction bus and the data bus.
SRAM = [(0x4037C000, 0x403E0000), (0x3FC80000, 0x3FCE0000)]
SHF_ALLOC = 0x2


def sections(path):
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 1:
        sys.exit(f"{path}: not a 32-bit ELF file")
    shoff, = struct.unpack_from("<I", elf, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x2E)
    heads = [struct.unpack_from("<IIIIIIIIII", elf, shoff + i * shentsize) for i in range(shnum)]
    names = heads[shstrndx]
    for h in heads:
        name_off, _type, flags, addr, _off, size = h[:6]
        start = names[4] + name_off
        name = elf[start:elf.index(b"\0", start)].decode()
        yield name, flags, addr, size


def main():
    p = argparse.ArgumentParser()
    p.add_argument("elf")
    p.add_argument("app")
    p.add_argument("--max-app", type=int, required=True)
    p.add_argument("--max-ram", type=int, required=True)
    a = p.parse_args()
    ram, other = {}, {}
    for name, flags, addr, size in sections(a.elf):
        if flags & SHF_ALLOC and size and any(lo <= addr < hi for lo, hi in SRAM):
            if name in (".stack", ".rwdata_dummy", ".dram2_uninit"):
                other[name] = size
            else:
                ram[name] = size
    static = sum(ram.values())
    app = os.path.getsize(a.app)
    detail = ", ".join(f"{n} {s}" for n, s in sorted(ram.items(), key=lambda x: -x[1]))
    print(f"app image: {app} bytes ({app / 1024:.1f} KiB; limit {a.max_app // 1024} KiB, slot 1792 KiB)")
    print(f"static RAM: {static} bytes ({static / 1024:.1f} KiB; limit {a.max_ram // 1024} KiB of 400 KiB): {detail}")
    print("not counted: " + ", ".join(f"{n} {s}" for n, s in sorted(other.items())))
    bad = []
    if app > a.max_app:
        bad.append("the app image is over its limit")
    if static > a.max_ram:
        bad.append("static RAM is over its limit")
    if bad:
        sys.exit("; ".join(bad))


if __name__ == "__main__":
    main()
