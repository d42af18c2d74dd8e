/* The ptrace guard (BPF LSM): an agent may not borrow a process outside its own agent.
 * ptrace attach, /proc/PID/mem, process_vm_writev and pidfd_getfd all ask ptrace_may_access(),
 * which calls the ptrace_access_check hook; PTRACE_TRACEME asks ptrace_traceme. An agent's
 * attach-mode access to a task that is not enrolled as the same agent is refused with EPERM,
 * and so is a process making an agent its tracer. Read-mode access (/proc/PID/environ, ps's
 * wchan) is left alone: it cannot make another process send. Compiled only where the kernel has
 * the BPF LSM (IL_GUARD); struct offsets come from the running kernel's BTF (interceptor/btf.py).
 * Where the BPF LSM cannot run, Landlock (interlock run) or Yama guard instead: see
 * interceptor/ptrace_guard.py. */
#define IL_EPERM 1
/* A refusal as a return of its own. Written as `cond ? 0 : -EPERM`, clang folds the two returns
 * into arithmetic (a negation) that the verifier of newer kernels (6.12) cannot bound to the LSM
 * return range [-4095, 0], and refuses to load the program; the empty volatile asm keeps the
 * refusing branch a branch. */
#define IL_REFUSE() ({ asm volatile("" ::: "memory"); -IL_EPERM; })

#ifdef IL_GUARD
#define IL_PTRACE_MODE_ATTACH 0x02

/* The cgroup id of a task on the default hierarchy: task->cgroups->dfl_cgrp->kn->id, the same
 * number bpf_get_current_cgroup_id() gives for the current task. */
static __always_inline u64 task_cgroup_id(const void *task) {
    const void *cset = 0, *cgrp = 0, *kn = 0;
    u64 id = 0;
    bpf_probe_read_kernel(&cset, sizeof(cset), task + IL_TASK_CGROUPS_OFF);
    if (!cset)
        return 0;
    bpf_probe_read_kernel(&cgrp, sizeof(cgrp), cset + IL_CSS_SET_DFL_CGRP_OFF);
    if (!cgrp)
        return 0;
    bpf_probe_read_kernel(&kn, sizeof(kn), cgrp + IL_CGROUP_KN_OFF);
    if (!kn)
        return 0;
    bpf_probe_read_kernel(&id, sizeof(id), kn + IL_KERNFS_NODE_ID_OFF);
    return id;
}

static __always_inline u32 task_tgid(const void *task) {
    u32 tgid = 0;
    bpf_probe_read_kernel(&tgid, sizeof(tgid), task + IL_TASK_TGID_OFF);
    return tgid;
}

/* The agent id a task is enrolled as, 0 when it is not (ids start at 1). */
static __always_inline u32 task_agent(const void *task) {
    u64 cg = task_cgroup_id(task);
    u32 *a = agent_cgroups.lookup(&cg);
    if (!a) {
        u32 tgid = task_tgid(task);
        a = agent_tgids.lookup(&tgid);
    }
    return a ? *a : 0;
}

/* ptrace_access_check(struct task_struct *child, unsigned int mode): current asks for child. */
LSM_PROBE(ptrace_access_check, void *child, unsigned int mode) {
    u32 agent;
    if (!(mode & IL_PTRACE_MODE_ATTACH) || !enrolled(&agent))
        return 0;
    if (task_agent(child) == agent)
        return 0;
    return IL_REFUSE();
}

/* ptrace_traceme(struct task_struct *parent): current asks to be traced by its parent. */
LSM_PROBE(ptrace_traceme, void *parent) {
    u32 tracer = task_agent(parent);
    if (!tracer)
        return 0;
    u32 self = 0;
    if (enrolled(&self) && self == tracer)
        return 0;
    return IL_REFUSE();
}
#endif

/* Refusals on record, whichever guard refused (this BPF LSM program, Landlock, Yama): an enrolled
 * process's ptrace, process_vm_readv/writev or pidfd_getfd that failed with EPERM is reported to
 * the daemon with the pid it named; so is a socket() the sock_create hook refused (raw, ping).
 * (A refused open of /proc/PID/mem is not: opens are too hot to trace host-wide.) Compiled
 * where the kernel has syscall tracepoints (IL_GUARD_RECORD). */
#ifdef IL_GUARD_RECORD
#include <asm/unistd.h>
#define IL_NR_PTRACE __NR_ptrace
#define IL_NR_PROCESS_VM_WRITEV __NR_process_vm_writev
#define IL_NR_PROCESS_VM_READV __NR_process_vm_readv
#define IL_NR_PIDFD_GETFD __NR_pidfd_getfd
#define IL_NR_SOCKET __NR_socket

BPF_PERF_OUTPUT(guard_events);
BPF_HASH(guard_pending, u64, u32, 4096);  /* thread -> pid it named, between enter and exit */

static __always_inline void guard_enter(u32 target) {
    u32 agent;
    if (!enrolled(&agent))
        return;
    u64 id = bpf_get_current_pid_tgid();
    guard_pending.update(&id, &target);
}

static __always_inline void guard_exit(void *ctx, u32 syscall, long ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 *target = guard_pending.lookup(&id);
    if (!target)
        return;
    u32 named = *target;
    guard_pending.delete(&id);
    u32 agent;
    if (ret != -IL_EPERM || !enrolled(&agent))
        return;
    struct il_guard_event ev = {};
    ev.tgid = id >> 32;
    ev.target_tgid = named;
    ev.uid = (u32)bpf_get_current_uid_gid();
    ev.agent_id = agent;
    ev.syscall = syscall;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    guard_events.perf_submit(ctx, &ev, sizeof(ev));
}

/* The records of the syscalls:sys_enter_* and sys_exit_* tracepoints (their layout is fixed by
 * the syscall trace events: 8 bytes of common fields, the syscall number, then the arguments or
 * the return value). Declared here rather than parsed from tracefs at each compile; the loader
 * attaches il_sys_enter/il_sys_exit to each syscall's pair. */
struct il_sys_enter { u64 common; s32 nr; s32 pad; u64 args[6]; };
struct il_sys_exit { u64 common; s32 nr; s32 pad; s64 ret; };

static __always_inline u32 guard_syscall(s32 nr) {
    if (nr == IL_NR_PTRACE) return IL_SYS_PTRACE;
    if (nr == IL_NR_PROCESS_VM_WRITEV) return IL_SYS_PROCESS_VM_WRITEV;
    if (nr == IL_NR_PROCESS_VM_READV) return IL_SYS_PROCESS_VM_READV;
    if (nr == IL_NR_PIDFD_GETFD) return IL_SYS_PIDFD_GETFD;
    if (nr == IL_NR_SOCKET) return IL_SYS_SOCKET;
    return 0;
}

/* ptrace(request, pid, ...), process_vm_*(pid, ...), pidfd_getfd(pidfd, ...): the second
 * argument for ptrace, the first otherwise; socket(family, type, protocol) packs all three. */
int il_sys_enter(struct il_sys_enter *ctx) {
    u32 sys = guard_syscall(ctx->nr);
    if (sys == IL_SYS_PTRACE)
        guard_enter((u32)ctx->args[1]);
    else if (sys == IL_SYS_SOCKET)
        guard_enter(((u32)ctx->args[0] << 24) | (((u32)ctx->args[1] & 0xff) << 16) | ((u32)ctx->args[2] & 0xffff));
    else if (sys)
        guard_enter((u32)ctx->args[0]);
    return 0;
}

int il_sys_exit(struct il_sys_exit *ctx) {
    u32 sys = guard_syscall(ctx->nr);
    if (sys)
        guard_exit(ctx, sys, ctx->ret);
    return 0;
}
#endif
