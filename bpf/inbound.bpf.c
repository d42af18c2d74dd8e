/* The second wall for inbound connections (docs/ARCHITECTURE.md, "Inbound connections"): nftables
 * diverts what other hosts send to agent sockets to the proxy; should a packet from a device other
 * than loopback reach an agent socket anyway, it is dropped here, before the socket sees it (a SYN
 * never makes a request socket, a datagram is never queued). Agent sockets are the ones
 * il_sock_create marked. Attached to the capture cgroup as cgroup_skb ingress (kernel >= 5.1 for
 * skb->sk and bpf_sk_fullsock). */
#include <uapi/linux/bpf.h>
#include "interlock.h"
#include "maps.h"

#define IL_LOOPBACK_IFINDEX 1  /* the loopback device is ifindex 1 in every network namespace */

int il_ingress(struct __sk_buff *skb) {
    if (skb->ifindex == IL_LOOPBACK_IFINDEX)
        return 1;
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 1;
    u32 zero = 0;
    struct il_settings *s = settings.lookup(&zero);
    if (!s)
        return 1;
    return sk->mark == s->mark ? 0 : 1;
}
