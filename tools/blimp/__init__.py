"""blimp's host side: boot blimp images in QEMU, drive the virtio balloon over QMP and the
guest agent over COM2, and measure it.  Run as ``PYTHONPATH=tools python3 -m blimp --help``."""
