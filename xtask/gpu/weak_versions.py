"""Marks an ELF executable's version requirements on some libraries as weak.

    python3 xtask/gpu/weak_versions.py FILE LIB [LIB ...]

Every version the executable requires from a library whose name starts with one of LIB (for
example `libcublas.so`) gets the VER_FLG_WEAK flag, so that the dynamic linker accepts a library
of another major version that lacks that version node (glibc then only warns). Used by
xtask/gpu/build.sh after `patchelf --clear-symbol-version`, which frees the symbols from their
versions but leaves the requirements themselves in `.gnu.version_r`. 64-bit little-endian ELF only.
"""

import struct
import sys

VER_FLG_WEAK = 0x2


def main() -> None:
    path, prefixes = sys.argv[1], sys.argv[2:]
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize
        )
        sections.append((name, typ, off, size, link))
    SHT_GNU_VERNEED = 0x6FFFFFFE
    marked = 0
    for _name, typ, off, _size, link in sections:
        if typ != SHT_GNU_VERNEED:
            continue
        strtab = sections[link][2]

        def string(at: int) -> str:
            end = data.index(b"\0", strtab + at)
            return data[strtab + at : end].decode()

        need = off
        while True:
            _ver, cnt, file_name, aux, nxt = struct.unpack_from("<HHIII", data, need)
            library = string(file_name)
            a = need + aux
            for _ in range(cnt):
                _hash, flags, _other, vname, anext = struct.unpack_from("<IHHII", data, a)
                if any(library.startswith(p) or string(vname).startswith(p) for p in prefixes):
                    struct.pack_into("<H", data, a + 4, flags | VER_FLG_WEAK)
                    print(f"{path}: {library} {string(vname)} marked weak")
                    marked += 1
                if anext == 0:
                    break
                a += anext
            if nxt == 0:
                break
            need += nxt
    open(path, "wb").write(data)
    print(f"{path}: {marked} version requirements marked weak")


if __name__ == "__main__":
    main()
