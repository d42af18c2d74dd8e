"""Kernel side of Interlock: BPF programs, nftables backstop, cgroups, the daemon and its CLI."""
