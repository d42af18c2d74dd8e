"""The offline kernel matrix: Debian kernels booted directly under QEMU, the datapath suite inside."""
