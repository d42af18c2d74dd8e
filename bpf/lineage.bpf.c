/* Process lineage: enroll at exec by path or uid selector (cgroup selectors need no exec hook:
 * their cgroup ids go straight into agent_cgroups), inherit across fork, forget at
 * exit. Runs synchronously in the task, so no connect() of an enrolled program can come first. */
#include <uapi/linux/bpf.h>
#include "interlock.h"
#include "maps.h"

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *agent = agent_tgids.lookup(&tgid);
    u32 found = 0;
    if (!agent) {
        u32 zero = 0;
        struct il_path *p = path_scratch.lookup(&zero);
        if (!p)
            return 0;
        __builtin_memset(p->s, 0, sizeof(p->s));
        unsigned short off = args->data_loc_filename & 0xFFFF;
        bpf_probe_read_kernel_str(p->s, sizeof(p->s), (char *)args + off);
        agent = exe_selectors.lookup(p);
        if (!agent) {
            u32 uid = (u32)bpf_get_current_uid_gid();
            agent = uid_selectors.lookup(&uid);
        }
        if (!agent)
            return 0;
        found = *agent;
        agent_tgids.update(&tgid, &found);
    } else {
        found = *agent;
    }
    struct il_exec_event ev = {};
    ev.tgid = tgid;
    ev.uid = (u32)bpf_get_current_uid_gid();
    ev.agent_id = found;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    exec_events.perf_submit(args, &ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 *agent = agent_tgids.lookup(&parent);
    if (!agent)
        return 0;
    u32 child = args->child_pid;
    u32 id = *agent;
    agent_tgids.update(&child, &id);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pt = bpf_get_current_pid_tgid();
    u32 pid = (u32)pt;
    agent_tgids.delete(&pid);
    return 0;
}
