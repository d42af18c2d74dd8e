/* Structs that cross between the kernel programs and Python.
 * Mirrored field for field in interceptor/bpf_types.py; change both together. */
#ifndef INTERLOCK_H
#define INTERLOCK_H

#define IL_AF_INET 2
#define IL_AF_INET6 10
#define IL_SOCK_STREAM 1
#define IL_SOCK_DGRAM 2
#define IL_SOCK_RAW 3
#define IL_IPPROTO_ICMP 1
#define IL_IPPROTO_ICMPV6 58
#define IL_COMM_LEN 16
#define IL_PATH_LEN 256

/* One per instance, index 0 of the `settings` array. Ports in network byte order. */
struct il_settings {
    __u32 proxy_port;
    __u32 dns_port;
    __u32 mark;
    __u32 lockdown;     /* non-zero: every agent connect and send is refused */
};

/* An endpoint as 16 address bytes (IPv4 as v4-mapped IPv6) and a host-order port. */
struct il_endpoint {
    __u8 addr[16];
    __u32 port;
};

/* What the proxy needs to know about an intercepted socket. */
struct il_origin {
    struct il_endpoint dst;  /* where the agent meant to go */
    __u32 family;            /* family the agent used for that address */
    __u32 agent_id;
    __u32 tgid;
    __u32 pid;
    __u32 uid;
    __u32 gid;
    __u64 cgroup_id;
    __u64 created_ns;        /* CLOCK_MONOTONIC at connect(), to sweep records never taken */
    char comm[IL_COMM_LEN];
};

/* An exec the lineage programs enrolled, reported to the daemon. */
struct il_exec_event {
    __u32 tgid;
    __u32 ppid;
    __u32 uid;
    __u32 agent_id;
    __u64 cgroup_id;
    char comm[IL_COMM_LEN];
    __u32 outside_scope;     /* a selector matched, but below no capture hook: not enrolled */
    __u32 pad;
};

/* An agent's ptrace-class syscall that a guard refused (EPERM), reported to the daemon. */
#define IL_SYS_PTRACE 1
#define IL_SYS_PROCESS_VM_WRITEV 2
#define IL_SYS_PROCESS_VM_READV 3
#define IL_SYS_PIDFD_GETFD 4
#define IL_SYS_SOCKET 5          /* target_tgid: family << 24 | type << 16 | protocol */
struct il_guard_event {
    __u32 tgid;          /* the agent process that asked */
    __u32 target_tgid;   /* the pid it named (the pidfd number, for pidfd_getfd) */
    __u32 uid;
    __u32 agent_id;
    __u32 syscall;       /* IL_SYS_* */
    __u32 pad;
    __u64 cgroup_id;
    char comm[IL_COMM_LEN];
};

#endif
