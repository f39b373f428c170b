/*
 * A way for the simulated trainer to sit in uninterruptible sleep (state D in /proc),
 * as a trainer stuck in a driver call or on a dead network file system does.
 *
 * hang_in_vfork() vfork()s. The kernel suspends the parent until the child calls exec or
 * _exit; it waits in wait_for_vfork_done() (kernel/fork.c) with TASK_KILLABLE, which
 * /proc reports as "D (disk sleep)" and which still ends on SIGKILL or on any signal whose
 * default action kills the process (SIGTERM, unless a handler is installed). The child
 * never execs: it pauses forever, so the parent stays in D until it is killed.
 *
 * The child shares the parent's memory, so it may only make plain system calls. It asks
 * for SIGKILL when its parent dies (PR_SET_PDEATHSIG): it is an artefact of the
 * simulation and must never outlive the trainer it keeps in D. If the child ends anyway
 * (someone killed it), the parent wakes and hang_in_vfork() returns.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

void hang_in_vfork(void) {
    pid_t parent = getpid();
    pid_t child = vfork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) {
            _exit(1); /* the parent died before PR_SET_PDEATHSIG took effect */
        }
        for (;;) {
            pause();
        }
    }
    /* vfork failed, or the child ended: the caller sees the call return. */
}
