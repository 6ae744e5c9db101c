#!/usr/bin/env python3
# Writes an image folder of random-noise PNGs (incompressible): ROOT N_PER_CLASS SIDE, 4 classes.
import os, struct, zlib, sys
root, n_per_class, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
for c in range(4):
    d = os.path.join(root, f"class-{c}"); os.makedirs(d, exist_ok=True)
    for i in range(n_per_class):
        raw = b"".join(b"\x00" + os.urandom(side * 3) for _ in range(side))
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")
        open(os.path.join(d, f"{i:05}.png"), "wb").write(png)
