/* Process lineage: enroll at exec by path or uid selector, inherit across fork, forget at exit.
 * (Cgroup selectors need no exec hook: their cgroup ids go straight into agent_cgroups.)
 * Raw tracepoints, attached through bpf links the daemon pins: they keep enrolling while the
 * daemon is down, and run synchronously in the task, so no connect() can come first. Kernel
 * structs are read at offsets taken from the running kernel's BTF (interceptor/btf.py), passed
 * in as IL_BPRM_FILENAME_OFF and IL_TASK_TGID_OFF. */
#include <uapi/linux/bpf.h>
#include "interlock.h"
#include "maps.h"

/* The capture cgroup (index 0, set by the daemon): a selector enrols only a process that execs
 * below it, where the socket hooks see its first socket. One that starts outside would make
 * sockets no hook sees until the daemon moved it: it is reported instead (IL_EXEC_OUTSIDE_SCOPE). */
BPF_CGROUP_ARRAY(capture_scope, 1);

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
int il_exec(struct bpf_raw_tracepoint_args *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *agent = agent_tgids.lookup(&tgid);
    u32 found = 0, outside = 0;
    if (!agent) {
        u32 zero = 0;
        struct il_path *p = path_scratch.lookup(&zero);
        if (!p)
            return 0;
        __builtin_memset(p->s, 0, sizeof(p->s));
        const char *filename = 0;
        bpf_probe_read_kernel(&filename, sizeof(filename), (void *)ctx->args[2] + IL_BPRM_FILENAME_OFF);
        bpf_probe_read_kernel_str(p->s, sizeof(p->s), filename);
        agent = exe_selectors.lookup(p);
        if (!agent) {
            u32 uid = (u32)bpf_get_current_uid_gid();
            agent = uid_selectors.lookup(&uid);
        }
        if (!agent)
            return 0;
        found = *agent;
        if (capture_scope.check_current_task(0) != 1)
            outside = 1;
        else
            agent_tgids.update(&tgid, &found);
    } else {
        found = *agent;
    }
    struct il_exec_event ev = {};
    ev.outside_scope = outside;
    ev.tgid = tgid;
    ev.uid = (u32)bpf_get_current_uid_gid();
    ev.agent_id = found;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    exec_events.perf_submit(ctx, &ev, sizeof(ev));
    return 0;
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child) */
int il_fork(struct bpf_raw_tracepoint_args *ctx) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 *agent = agent_tgids.lookup(&parent);
    if (!agent)
        return 0;
    u32 child = 0;
    bpf_probe_read_kernel(&child, sizeof(child), (void *)ctx->args[1] + IL_TASK_TGID_OFF);
    if (child == 0 || child == parent)
        return 0;  /* a new thread of an enrolled process: already covered by its tgid */
    u32 id = *agent;
    agent_tgids.update(&child, &id);
    return 0;
}

/* sched_process_exit(struct task_struct *p): the group leader's exit ends the process's entry */
int il_exit(struct bpf_raw_tracepoint_args *ctx) {
    u64 pt = bpf_get_current_pid_tgid();
    if ((u32)pt == (u32)(pt >> 32)) {
        u32 tgid = pt >> 32;
        agent_tgids.delete(&tgid);
    }
    return 0;
}
