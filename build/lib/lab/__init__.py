"""Throwaway test hosts for the tests, the demo and the benchmarks: network namespaces joined by
veth, a cgroup of their own, and real servers inside them. Nothing here touches the host's own
network namespace or its root cgroup."""
