/* Every map of an instance, declared once. The loader rewrites each IL_MAP line into a fresh map or,
 * when the instance already pinned one in bpffs, into that pinned map, so a restarted daemon adopts
 * the connections in flight and the proxy keeps reading the same objects. */
#ifndef INTERLOCK_MAPS_H
#define INTERLOCK_MAPS_H

struct il_path { char s[IL_PATH_LEN]; };

IL_MAP(array, u32, struct il_settings, settings, 1);
IL_MAP(hash, u64, u32, agent_cgroups, 4096);
IL_MAP(lru_hash, u32, u32, agent_tgids, 65536);
/* socket cookie -> origin, for getpeername/recvmsg and for sock_ops to copy from */
IL_MAP(lru_hash, u64, struct il_origin, by_cookie, 65536);
/* agent socket's local endpoint (the proxy's peer) -> origin; the proxy reads and deletes */
IL_MAP(lru_hash, struct il_endpoint, struct il_origin, by_peer, 65536);
IL_MAP(hash, struct il_path, u32, exe_selectors, 1024);
IL_MAP(hash, u32, u32, uid_selectors, 1024);
IL_MAP(percpu_array, u32, struct il_path, path_scratch, 1);
BPF_PERF_OUTPUT(exec_events);

#endif
