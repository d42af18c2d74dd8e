/* Socket hooks on the capture cgroup: send every enrolled TCP connection to the local proxy,
 * DNS to the local resolver, and refuse everything else an agent tries (other UDP, raw sockets).
 * A process is enrolled when its cgroup is an agent cgroup or its tgid was enrolled at exec. */
#include <uapi/linux/bpf.h>
#include "interlock.h"
#include "maps.h"

#define IL_LOOPBACK4 0x7f000001
/* One 32-bit context load: clang would otherwise merge neighbours into a 64-bit load, which the
 * verifier rejects for these context fields. */
#define CTX32(field) (*(volatile u32 *)&(field))

static __always_inline struct il_settings *get_settings(void) {
    u32 zero = 0;
    return settings.lookup(&zero);
}

static __always_inline int enrolled(u32 *agent) {
    u64 cg = bpf_get_current_cgroup_id();
    u32 *a = agent_cgroups.lookup(&cg);
    if (!a) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        a = agent_tgids.lookup(&tgid);
    }
    if (!a)
        return 0;
    *agent = *a;
    return 1;
}

static __always_inline void fill_identity(struct il_origin *o, u32 agent) {
    u64 pt = bpf_get_current_pid_tgid();
    u64 ug = bpf_get_current_uid_gid();
    o->agent_id = agent;
    o->tgid = pt >> 32;
    o->pid = (u32)pt;
    o->uid = (u32)ug;
    o->gid = ug >> 32;
    o->cgroup_id = bpf_get_current_cgroup_id();
    o->created_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&o->comm, sizeof(o->comm));
}

static __always_inline void set_mapped4(u8 *addr, u32 ip4_be) {
    __builtin_memset(addr, 0, 10);
    addr[10] = 0xff;
    addr[11] = 0xff;
    __builtin_memcpy(addr + 12, &ip4_be, 4);
}

static __always_inline int is_dns_port(u32 user_port) {
    return user_port == bpf_htons(53);
}

/* The port an enrolled socket is sent to: the proxy for TCP (only where `tcp` is set: connect),
 * the resolver for DNS, 0 to refuse. */
static __always_inline u32 target_port(struct bpf_sock_addr *ctx, struct il_settings *s, int tcp) {
    if (tcp && ctx->type == IL_SOCK_STREAM)
        return s->proxy_port;
    if (ctx->type == IL_SOCK_DGRAM && is_dns_port(ctx->user_port))
        return s->dns_port;
    return 0;
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx, int tcp) {
    u32 agent;
    if (!enrolled(&agent))
        return 1;
    struct il_settings *s = get_settings();
    if (!s || s->lockdown)
        return 0;
    u32 port = target_port(ctx, s, tcp);
    if (!port)
        return 0;
    struct il_origin o = {};
    set_mapped4(o.dst.addr, ctx->user_ip4);
    o.dst.port = bpf_ntohs(ctx->user_port);
    o.family = IL_AF_INET;
    fill_identity(&o, agent);
    u64 cookie = bpf_get_socket_cookie(ctx);
    by_cookie.update(&cookie, &o);
    ctx->user_ip4 = bpf_htonl(IL_LOOPBACK4);
    ctx->user_port = port;
    return 1;
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx, int tcp) {
    u32 agent;
    if (!enrolled(&agent))
        return 1;
    struct il_settings *s = get_settings();
    if (!s || s->lockdown)
        return 0;
    u32 port = target_port(ctx, s, tcp);
    if (!port)
        return 0;
    struct il_origin o = {};
    u32 w0 = CTX32(ctx->user_ip6[0]), w1 = CTX32(ctx->user_ip6[1]), w2 = CTX32(ctx->user_ip6[2]), w3 = CTX32(ctx->user_ip6[3]);
    __builtin_memcpy(o.dst.addr, &w0, 4);
    __builtin_memcpy(o.dst.addr + 4, &w1, 4);
    __builtin_memcpy(o.dst.addr + 8, &w2, 4);
    __builtin_memcpy(o.dst.addr + 12, &w3, 4);
    o.dst.port = bpf_ntohs(ctx->user_port);
    o.family = IL_AF_INET6;
    fill_identity(&o, agent);
    u64 cookie = bpf_get_socket_cookie(ctx);
    by_cookie.update(&cookie, &o);
    /* v4-mapped destinations go to ::1 as well: the socket is dual-stack if it could reach them. */
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = port;
    return 1;
}

int il_connect4(struct bpf_sock_addr *ctx) { return redirect4(ctx, 1); }
int il_connect6(struct bpf_sock_addr *ctx) { return redirect6(ctx, 1); }
/* Unconnected UDP: DNS goes to the resolver, everything else is refused. */
int il_sendmsg4(struct bpf_sock_addr *ctx) { return redirect4(ctx, 0); }
int il_sendmsg6(struct bpf_sock_addr *ctx) { return redirect6(ctx, 0); }

/* Replies from the resolver, and getpeername() on redirected sockets, show the address the
 * agent asked for, so resolvers that check the reply's source keep working. */
static __always_inline void restore4(struct bpf_sock_addr *ctx) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct il_origin *o = by_cookie.lookup(&cookie);
    if (!o || o->family != IL_AF_INET)
        return;
    u32 ip;
    __builtin_memcpy(&ip, o->dst.addr + 12, 4);
    ctx->user_ip4 = ip;
    ctx->user_port = bpf_htons(o->dst.port);
}

static __always_inline void restore6(struct bpf_sock_addr *ctx) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct il_origin *o = by_cookie.lookup(&cookie);
    if (!o || o->family != IL_AF_INET6)
        return;
    u32 w0, w1, w2, w3;
    __builtin_memcpy(&w0, o->dst.addr, 4);
    __builtin_memcpy(&w1, o->dst.addr + 4, 4);
    __builtin_memcpy(&w2, o->dst.addr + 8, 4);
    __builtin_memcpy(&w3, o->dst.addr + 12, 4);
    ctx->user_ip6[0] = w0;
    ctx->user_ip6[1] = w1;
    ctx->user_ip6[2] = w2;
    ctx->user_ip6[3] = w3;
    ctx->user_port = bpf_htons(o->dst.port);
}

int il_recvmsg4(struct bpf_sock_addr *ctx) { restore4(ctx); return 1; }
int il_recvmsg6(struct bpf_sock_addr *ctx) { restore6(ctx); return 1; }
int il_getpeername4(struct bpf_sock_addr *ctx) { restore4(ctx); return 1; }
int il_getpeername6(struct bpf_sock_addr *ctx) { restore6(ctx); return 1; }

/* TCP_CONNECT runs in the connecting task after the local port is chosen and before the SYN:
 * the proxy's accept() can never come first. */
int il_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct il_origin *o = by_cookie.lookup(&cookie);
    if (!o)
        return 1;
    struct il_endpoint key = {};
    if (skops->family == IL_AF_INET) {
        set_mapped4(key.addr, skops->local_ip4);
    } else {
        u32 w0 = CTX32(skops->local_ip6[0]), w1 = CTX32(skops->local_ip6[1]);
        u32 w2 = CTX32(skops->local_ip6[2]), w3 = CTX32(skops->local_ip6[3]);
        __builtin_memcpy(key.addr, &w0, 4);
        __builtin_memcpy(key.addr + 4, &w1, 4);
        __builtin_memcpy(key.addr + 8, &w2, 4);
        __builtin_memcpy(key.addr + 12, &w3, 4);
    }
    key.port = skops->local_port;
    by_peer.update(&key, o);
    return 1;
}

/* ICMP "ping" datagram sockets (net.ipv4.ping_group_range): they carry data in echo requests
 * and no connect/sendmsg hook sees them. */
static __always_inline int is_ping(struct bpf_sock *sk) {
    return sk->type == IL_SOCK_DGRAM && (sk->protocol == IL_IPPROTO_ICMP || sk->protocol == IL_IPPROTO_ICMPV6);
}

/* Every inet socket an agent opens carries the instance mark, so the nftables backstop sees it
 * even before the daemon has moved a selector-enrolled process into its cgroup. Raw and ping
 * sockets are refused outright: they would bypass connect(). */
int il_sock_create(struct bpf_sock *sk) {
    u32 agent;
    if (!enrolled(&agent))
        return 1;
    struct il_settings *s = get_settings();
    if (!s || sk->type == IL_SOCK_RAW || is_ping(sk))
        return 0;
    sk->mark = s->mark;
    return 1;
}

int il_sock_release(struct bpf_sock *sk) {
    u64 cookie = bpf_get_socket_cookie(sk);
    by_cookie.delete(&cookie);
    return 1;
}
