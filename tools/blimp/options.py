"""Command-line options that several subcommands share, and their argparse types."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .qemu import ACCELS, MACHINES, Qemu, parse_memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_KERNEL = os.path.join(REPO, "build", "blimp.elf")


def memory_arg(value: str) -> str:
    """argparse type: a QEMU -m size such as 128M or 4G (kept as text)."""
    try:
        parse_memory(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return value


def size_arg(value: str) -> int:
    """argparse type: bytes from '512M', '1G', '4096K', '0' (bare = MiB, like -m)."""
    if value.strip() == "0":
        return 0
    try:
        return parse_memory(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def keyval_arg(value: str) -> str:
    """argparse type: key=value."""
    if "=" not in value or value.startswith("="):
        raise argparse.ArgumentTypeError("expected key=value, got %r" % value)
    return value


def add_qemu_options(p: argparse.ArgumentParser, machine_default: str = "q35",
                     single_machine: bool = True) -> None:
    """Options shared by every subcommand that boots QEMU."""
    p.add_argument("--kernel", default=DEFAULT_KERNEL,
                   help="image to boot (default: build/blimp.elf; build/blimp-mb1.elf is "
                        "the multiboot1 image)")
    if single_machine:
        p.add_argument("--machine", choices=MACHINES, default=machine_default)
    p.add_argument("--memory", "-m", type=memory_arg, default="128M",
                   help="guest RAM, e.g. 128M, 4G (default 128M)")
    p.add_argument("--accel", choices=ACCELS, default="auto",
                   help="auto = TCG unless kvm_intel/kvm_amd is loaded (PVM's /dev/kvm "
                        "does not count)")
    p.add_argument("--append", default=None, help="kernel command line")
    p.add_argument("--balloon", action="store_true",
                   help="add a virtio-balloon device (-pci on pc/q35, -device on microvm)")
    p.add_argument("--balloon-opt", action="append", type=keyval_arg, default=[],
                   metavar="KEY=VAL",
                   help="extra balloon device property, e.g. deflate-on-oom=on, "
                        "disable-modern=on, disable-legacy=on (repeatable)")
    p.add_argument("--machine-opt", action="append", type=keyval_arg, default=[],
                   metavar="KEY=VAL", help="extra -machine property, e.g. acpi=off")
    p.add_argument("--smp", type=int, default=None)
    p.add_argument("--agent", action="store_true",
                   help="add COM2 as a unix-socket server (agent channel); path printed")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra raw QEMU argument (repeatable; use --qemu-arg=-foo)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="kill QEMU after this many seconds (default 60)")
    p.add_argument("--boot", choices=("kernel", "grub-bios", "grub-ovmf", "efi", "bzimage",
                                      "grub-linux-bios", "grub-linux-ovmf"),
                   default="kernel",
                   help="kernel: QEMU -kernel (default); grub-bios / grub-ovmf: a GRUB ISO "
                        "(multiboot2) on SeaBIOS / OVMF; efi: blimp.efi from a FAT disk on "
                        "OVMF (OVMF: TCG only); bzimage: QEMU -kernel blimp.bzImage (the Linux "
                        "boot protocol); grub-linux-*: GRUB's linux command with blimp.bzImage. "
                        "The ISO or disk carries --append, made for it under build/images/")


def add_balloon_guest_options(p: argparse.ArgumentParser, memory: str, accel: str) -> None:
    """The guest options of the subcommands that always boot a pc/q35 guest with a balloon
    and the agent (demo, bench-balloon)."""
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machine", choices=("pc", "q35"), default="q35")
    p.add_argument("--memory", "-m", type=memory_arg, default=memory,
                   help="guest RAM (default %s)" % memory)
    p.add_argument("--accel", choices=ACCELS, default=accel)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--balloon-opt", action="append", type=keyval_arg, default=[],
                   metavar="KEY=VAL", help="extra balloon device property (repeatable)")


def qemu_from_args(args: argparse.Namespace, **overrides: Any) -> Qemu:
    """A Qemu for the options of add_qemu_options, with `overrides` on top."""
    kw = dict(machine=args.machine, memory=args.memory, accel=args.accel,
              append=args.append, balloon=args.balloon, balloon_opts=args.balloon_opt,
              machine_opts=args.machine_opt, smp=args.smp, agent=args.agent,
              extra_args=args.qemu_arg, timeout=args.timeout)
    kw.update(overrides)
    kernel, media = boot_media_from_args(args, kw.get("append"))
    kw.update(media)
    return Qemu(kernel, **kw)


def boot_media_from_args(args: argparse.Namespace, append: str | None) -> tuple:
    """(kernel, Qemu keywords) for --boot: -kernel with append, or an ISO/ESP carrying it."""
    boot = getattr(args, "boot", "kernel")
    if boot == "kernel":
        return args.kernel, {"append": append}
    from . import images
    media = images.boot_media(boot, append or "", os.path.dirname(os.path.abspath(args.kernel)))
    return media.pop("kernel"), media


def balloon_append(base: str | None, pfns: int | None = None,
                   buffers: int | None = None) -> str | None:
    """The kernel command line `base` plus the balloon's pfns/buffers options."""
    words = (base or "").split()
    if pfns is not None:
        words.append("blimp.balloon.pfns=%d" % pfns)
    if buffers is not None:
        words.append("blimp.balloon.buffers=%d" % buffers)
    return " ".join(words) or None
