"""Bootable media around blimp for a given command line, cached by content hash.

    from blimp import images
    iso = images.iso("blimp.mode=boot")        # GRUB (SeaBIOS and UEFI) -> blimp.elf, multiboot2
    iso = images.iso("...", kernel="build/blimp.bzImage", command="linux")  # GRUB's `linux`
    esp = images.esp("blimp.mode=boot")        # FAT: \\EFI\\BOOT\\BOOTX64.EFI = blimp.efi,
                                               #      the command line in \\blimp\\cmdline
    esp = images.esp_shell("blimp.mode=boot")  # FAT: \\blimp.efi started by the UEFI shell's
                                               #      startup.nsh, the command line as load options

Each image lands in build/images/<sha256 of its inputs>.<ext> and is reused while the kernel
(or blimp.efi) and the command line are the same; a GRUB ISO takes about a second to make.
``python3 -m blimp.images iso --kernel build/blimp.elf --cmdline "" --out build/blimp.iso``
is what the build runs for build/blimp.iso.  Needs grub-mkrescue (grub-common, grub-pc-bin,
grub-efi-amd64-bin), xorriso and mtools.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "build")
CACHE = os.path.join(BUILD, "images")
#: where blimp.efi looks for its command line when it has no load options (boot/efi/main.c)
CMDLINE_FILE = ("blimp", "cmdline")
ESP_BYTES = 8 << 20
#: bump when the layout of an image changes, so cached ones are not reused
LAYOUT = 2
#: cached images kept (least recently used go first; a GRUB ISO is about 20 MB)
CACHE_KEEP = 16


class ImageError(Exception):
    pass


def _run(argv: Sequence[str], timeout: float = 120.0) -> None:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ImageError("%s not found (./blimp installs grub-common, grub-pc-bin, "
                         "grub-efi-amd64-bin, xorriso and mtools)" % e.filename) from None
    if r.returncode != 0:
        raise ImageError("%s failed (status %d):\n%s%s" % (
            " ".join(argv), r.returncode, r.stdout, r.stderr))


def _key(kind: str, parts: Sequence[bytes]) -> str:
    h = hashlib.sha256(("%s:%d" % (kind, LAYOUT)).encode())
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:24]


def _read(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ImageError("%s not found (build with `ninja`)" % path)
    with open(path, "rb") as f:
        return f.read()


def _cached(kind: str, ext: str, parts: Sequence[bytes], make, out: Optional[str]) -> str:
    """The image for these inputs: out if given (always made), else build/images/<hash>.ext."""
    if out is None:
        os.makedirs(CACHE, exist_ok=True)
        out = os.path.join(CACHE, "%s-%s.%s" % (kind, _key(kind, parts), ext))
        if os.path.isfile(out):
            os.utime(out)              # recently used: kept by _prune
            return out
        _prune()
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blimp-img-", dir=out_dir) as tmp:
        made = make(tmp)
        os.replace(made, out)          # atomic: a parallel user sees the old file or the new
    return out


def _prune() -> None:
    """Drop all but the CACHE_KEEP - 1 most recently used cached images (every kernel
    change makes new ones)."""
    try:
        names = [os.path.join(CACHE, n) for n in os.listdir(CACHE)
                 if n.endswith((".iso", ".img"))]
        names.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
        for old in names[CACHE_KEEP - 1:]:
            os.unlink(old)
    except OSError:
        pass                           # a parallel user removed it first: fine


def grub_word(w: str) -> str:
    """One word of a grub.cfg command, single-quoted so GRUB's parser leaves $, ; and the
    like alone."""
    return "'" + w + "'"


def grub_cfg(cmdline: str, kernel_name: str = "blimp.elf", command: str = "multiboot2") -> str:
    """`command` is multiboot2 (blimp.elf) or linux (blimp.bzImage: the Linux boot protocol's
    32-bit entry, GRUB's own boot_params; GRUB puts BOOT_IMAGE=<file> in front of the command
    line, which blimp ignores as foreign). GRUB's multiboot2 command puts a backslash before every quote and backslash of the
    command line it builds (measured: z='q' arrives as z=\\'q\\'), so such a command line
    cannot reach the kernel unchanged: refused."""
    bad = sorted(set(c for c in cmdline if c in "'\"\\"))
    if bad:
        raise ImageError("GRUB would escape %s in the command line %r" % (" ".join(bad), cmdline))
    args = "".join(" " + grub_word(w) for w in cmdline.split())
    # On BIOS GRUB's messages (a load error, say) would only reach the VGA console, which no
    # test sees: copy them to COM1. OVMF already mirrors its console to the serial port.
    return ("set timeout=0\nset timeout_style=hidden\n"
            "if [ \"$grub_platform\" = pc ]; then\n"
            "  serial --unit=0 --speed=115200\n  terminal_output --append serial\nfi\n"
            "menuentry \"blimp\" {\n  %s /boot/%s%s\n  boot\n}\n" % (command, kernel_name, args))


def iso(cmdline: str = "", kernel: Optional[str] = None, out: Optional[str] = None,
        command: str = "multiboot2") -> str:
    """A hybrid GRUB ISO (BIOS El Torito + UEFI) that boots `kernel` (default
    build/blimp.elf) through `command` (multiboot2, or linux for blimp.bzImage) with
    `cmdline`; returns its path."""
    kernel = kernel or os.path.join(BUILD, "blimp.elf")
    data = _read(kernel)
    name = os.path.basename(kernel) if command == "linux" else "blimp.elf"

    def make(tmp: str) -> str:
        root = os.path.join(tmp, "root")
        os.makedirs(os.path.join(root, "boot", "grub"))
        with open(os.path.join(root, "boot", name), "wb") as f:
            f.write(data)
        with open(os.path.join(root, "boot", "grub", "grub.cfg"), "w") as f:
            f.write(grub_cfg(cmdline, name, command))
        path = os.path.join(tmp, "blimp.iso")
        _run(["grub-mkrescue", "-o", path, root])
        return path

    return _cached("iso", "iso", [data, cmdline.encode(), command.encode()], make, out)


def _fat(tmp: str, files: List[tuple]) -> str:
    """A FAT image (mtools, no root needed) holding files [(dos path parts, bytes)]."""
    path = os.path.join(tmp, "esp.img")
    with open(path, "wb") as f:
        f.truncate(ESP_BYTES)
    _run(["mformat", "-i", path, "::"])
    dirs = set()
    for parts, data in files:
        for i in range(1, len(parts)):
            d = "::/" + "/".join(parts[:i])
            if d not in dirs:
                _run(["mmd", "-i", path, d])
                dirs.add(d)
        src = os.path.join(tmp, "f-%d" % len(dirs) + parts[-1])
        with open(src, "wb") as f:
            f.write(data)
        _run(["mcopy", "-i", path, src, "::/" + "/".join(parts)])
    return path


def esp(cmdline: Optional[str] = "", efi: Optional[str] = None,
        out: Optional[str] = None, inject: Optional[str] = None) -> str:
    """A FAT image booting blimp.efi as the removable-media default \\EFI\\BOOT\\BOOTX64.EFI,
    with `cmdline` in \\blimp\\cmdline (None: no such file). `inject` goes to
    \\blimp\\inject: damage blimp.efi does on purpose ("mb2_tag_size", for tests)."""
    efi = efi or os.path.join(BUILD, "blimp.efi")
    app = _read(efi)
    files = [(("EFI", "BOOT", "BOOTX64.EFI"), app)]
    if cmdline is not None:
        files.append((CMDLINE_FILE, cmdline.encode() + b"\n"))
    if inject is not None:
        files.append((("blimp", "inject"), inject.encode()))
    return _cached("esp", "img", [app, b"-" if cmdline is None else b"+" + cmdline.encode(),
                                  (inject or "").encode()],
                   lambda tmp: _fat(tmp, files), out)


def esp_shell(cmdline: str, decoy: str = "blimp.mode=selftest", efi: Optional[str] = None,
              out: Optional[str] = None) -> str:
    """A FAT image without BOOTX64.EFI, so OVMF falls back to its UEFI shell, whose
    startup.nsh starts \\blimp.efi with `cmdline` as load options; \\blimp\\cmdline holds
    `decoy`, which must then be ignored."""
    efi = efi or os.path.join(BUILD, "blimp.efi")
    app = _read(efi)
    files = [(("blimp.efi",), app), (CMDLINE_FILE, decoy.encode() + b"\n"),
             (("startup.nsh",), ("fs0:\\blimp.efi %s\r\n" % cmdline).encode())]
    return _cached("shell", "img", [app, cmdline.encode(), decoy.encode()],
                   lambda tmp: _fat(tmp, files), out)


# ------------------------------------------------------------ boot paths

#: every way blimp boots: path id -> (protocol the guest reports, OVMF?, what carries the
#: command line: QEMU's -append, a GRUB ISO's grub.cfg or blimp.efi's ESP)
BOOT_PATHS = {
    "pvh": ("pvh", False, "append"),
    "mb1": ("multiboot1", False, "append"),
    "grub-bios": ("multiboot2", False, "iso"),
    "grub-ovmf": ("multiboot2", True, "iso"),
    "efi": ("uefi", True, "esp"),
    "bzimage": ("linux", False, "append"),
    "grub-linux-bios": ("linux", False, "iso"),
    "grub-linux-ovmf": ("linux", True, "iso"),
}
#: the image QEMU's -kernel loads for each -append path
KERNEL_IMAGES = {"pvh": "blimp.elf", "mb1": "blimp-mb1.elf", "bzimage": "blimp.bzImage"}


def cmdline_seen(path: str, cmdline: str) -> str:
    """The command line the kernel reports for `path` booted with `cmdline`."""
    if path.startswith("grub-linux"):
        return ("BOOT_IMAGE=/boot/blimp.bzImage " + cmdline).strip()
    return cmdline


def boot_media(path: str, cmdline: str, build_dir: str = BUILD) -> dict:
    """blimp.qemu.Qemu keywords (kernel, append, cdrom, disk, ovmf) that boot `path` with
    `cmdline`, making the ISO or ESP if needed."""
    _, ovmf, carrier = BOOT_PATHS[path]
    if carrier == "append":
        return {"kernel": os.path.join(build_dir, KERNEL_IMAGES[path]),
                "append": cmdline or None}
    if carrier == "iso" and path.startswith("grub-linux"):
        media = {"cdrom": iso(cmdline, kernel=os.path.join(build_dir, "blimp.bzImage"),
                              command="linux")}
    elif carrier == "iso":
        media = {"cdrom": iso(cmdline, kernel=os.path.join(build_dir, "blimp.elf"))}
    else:
        media = {"disk": esp(cmdline, efi=os.path.join(build_dir, "blimp.efi"))}
    return dict(media, kernel=None, append=None, ovmf=ovmf)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m blimp.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("iso", "esp", "esp-shell"))
    p.add_argument("--cmdline", default="")
    p.add_argument("--kernel", help="blimp.elf for an ISO, blimp.efi for an ESP")
    p.add_argument("--command", choices=("multiboot2", "linux"), default="multiboot2",
                   help="ISO: GRUB's command (linux: give --kernel build/blimp.bzImage)")
    p.add_argument("--out", help="write here (default: the cache, path printed)")
    a = p.parse_args(argv)
    try:
        if a.kind == "iso":
            path = iso(a.cmdline, a.kernel, a.out, command=a.command)
        elif a.kind == "esp":
            path = esp(a.cmdline, a.kernel, a.out)
        else:
            path = esp_shell(a.cmdline, efi=a.kernel, out=a.out)
    except ImageError as e:
        print("blimp.images: error: %s" % e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
