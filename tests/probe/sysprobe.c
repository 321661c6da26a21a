/* sysprobe: tries the calls a seccomp profile decides on and prints one line
 * per call, "name=ok" or "name=<errno name>", for tests/tests/seccomp.rs.
 * Built static (gcc -static -pthread) so it runs in any image. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static const char *err_name(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case ENOENT: return "ENOENT";
    case ENOKEY: return "ENOKEY";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EFAULT: return "EFAULT";
    case ENODEV: return "ENODEV";
    default: return "other";
    }
}

/* rc < 0 means failure with errno. */
static void report(const char *name, long rc) {
    if (rc < 0)
        printf("%s=%s\n", name, err_name(errno));
    else
        printf("%s=ok\n", name);
    fflush(stdout);
}

/* Runs a call in a child, so a call that succeeds (unshare) changes nothing here. */
static void in_child(const char *name, long (*f)(void)) {
    int fds[2];
    if (pipe(fds) < 0) return;
    pid_t pid = fork();
    if (pid == 0) {
        long rc = f();
        int e = rc < 0 ? errno : 0;
        if (write(fds[1], &e, sizeof e) < 0) _exit(1);
        _exit(0);
    }
    int e = -1;
    close(fds[1]);
    if (read(fds[0], &e, sizeof e) != sizeof e) e = -1;
    waitpid(pid, NULL, 0);
    close(fds[0]);
    if (e == 0) printf("%s=ok\n", name);
    else if (e > 0) printf("%s=%s\n", name, err_name(e));
    else printf("%s=died\n", name);
    fflush(stdout);
}

static long do_unshare_user(void) { return unshare(CLONE_NEWUSER); }
static long do_unshare_mount(void) { return unshare(CLONE_NEWNS); }
static long do_mount(void) { return mount("none", "/mnt", "tmpfs", 0, NULL); }
static long do_clone_userns(void) {
    long rc = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (rc == 0) _exit(0);
    if (rc > 0) waitpid(rc, NULL, 0);
    return rc;
}

static void *thread_main(void *arg) { return arg; }

int main(void) {
    in_child("unshare_user", do_unshare_user);
    in_child("unshare_mount", do_unshare_mount);
    in_child("mount", do_mount);
    in_child("clone_userns", do_clone_userns);

    /* clone3 with a too-small struct: EINVAL when the kernel looks at it. */
    char args[8] = {0};
    report("clone3", syscall(SYS_clone3, args, sizeof args));

    /* KEYCTL_GET_KEYRING_ID of the session keyring, without creating it. */
    report("keyctl", syscall(SYS_keyctl, 0, -3, 0));
    report("add_key", syscall(SYS_add_key, "user", "skiff-probe", "x", 1, -3));

    /* perf_event_attr, first version (64 bytes): a software task clock of
     * this process, user space only (bit 5 of the flags: exclude_kernel). */
    struct { unsigned int type, size; unsigned long long config, period, sample_type, read_format, flags, rest[3]; } attr;
    memset(&attr, 0, sizeof attr);
    attr.type = 1;
    attr.size = 64;
    attr.config = 1;
    attr.flags = 1ULL << 5;
    report("perf_event_open", syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));

    report("socket_alg", socket(AF_ALG, SOCK_SEQPACKET, 0));
    report("socket_vsock", socket(AF_VSOCK, SOCK_STREAM, 0));
    report("socket_inet", socket(AF_INET, SOCK_STREAM, 0));
    report("socket_unix", socket(AF_UNIX, SOCK_STREAM, 0));
    report("personality_query", personality(0xffffffff));
    report("personality_exec", personality(READ_IMPLIES_EXEC));

    /* glibc tries clone3 first and falls back to clone on ENOSYS. */
    pthread_t t;
    int e = pthread_create(&t, NULL, thread_main, NULL);
    if (e == 0) e = pthread_join(t, NULL);
    errno = e;
    report("thread", e ? -1 : 0);

    pid_t pid = fork();
    if (pid == 0) _exit(7);
    int status = 0;
    waitpid(pid, &status, 0);
    report("fork", pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 7 ? 0 : -1);
    printf("probe=done\n");
    return 0;
}
