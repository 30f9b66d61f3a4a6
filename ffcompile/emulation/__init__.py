"""Running aarch64 artifacts on an x86 host under qemu-user: the cached sysroot (``qemu``) and
parity on an emulated device (``verify``)."""
