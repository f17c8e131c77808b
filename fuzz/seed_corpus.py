#!/usr/bin/env python3
"""Write the seed corpus: the undamaged image, and one small edit of each
kind of structure of the harness's 16 MiB base image (see src/lib.rs for
the input format), raw and with the inode checksum recomputed."""
import os, struct

BLOCK = 4096
# The 16 MiB geometry: journal at block 2 (64 blocks), inode table at 66
# (128 blocks), bitmap at 194, bitmap checksums at 195, data from 512.
places = {
    "superblock": 20,
    "state": 1 * BLOCK,
    "journal-header": 2 * BLOCK + 8,
    "journal-ring": 3 * BLOCK + 40,
    "root-inode": 66 * BLOCK,
    "inode-3-size": 66 * BLOCK + 2 * 256 + 16,
    "inode-5-extent": 66 * BLOCK + 4 * 256 + 120,
    "unused-inode": 66 * BLOCK + 1500 * 256,
    "bitmap": 194 * BLOCK + 64,
    "bitmap-csum": 195 * BLOCK,
    "data-area": 512 * BLOCK + 100,
    "data-area-2": 513 * BLOCK + 48,
    "backup-superblock": 512 * BLOCK + (512 << 10) + 24,
}

def record(kind, offset, data):
    return struct.pack("<BIB", kind, offset, len(data)) + bytes(data)

for target in ("mount", "fsck"):
    out = os.path.join(os.path.dirname(__file__), "corpus", target)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "undamaged"), "wb").write(b"")
    for name, at in places.items():
        open(os.path.join(out, f"{name}-raw"), "wb").write(record(0, at, [0xff]))
        open(os.path.join(out, f"{name}-field"), "wb").write(record(1, at, [0x01, 0, 0, 0x80]))
