/* watchdog: a thread per rank that turns a hang into the end of the job (DESIGN §10).
 * If this rank has been inside one collective or one layer step with its
 * peers (agreement, forward, stats reduction) for longer than
 * scheduler.stall_timeout_ms, a peer died or hangs: log why and abort the
 * whole job, so the supervisor restarts it. A 1-rank job has no peers and
 * is never aborted for a long step.
 * Also sd_notify without libsystemd (one datagram to $NOTIFY_SOCKET). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../config/moe_log.h"
#include "moe_daemon.h"
#include "moe_mpi_boot.h"

static pthread_t watchdog_thread;
static atomic_int watchdog_running;

static void *watchdog_main(void *arg) {
    moe_daemon_t *daemon = arg;
    while (atomic_load(&watchdog_running)) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
        char msg[512];
        const moe_backend_ops_t *ops = daemon->backend.ops;
        if (ops != NULL && ops->check != NULL && ops->check(daemon->backend.state, msg, sizeof msg) != MOE_OK) {
            moe_log(MOE_LOG_ERROR, "watchdog", "rank %d: %s; aborting the job", daemon->ep.rank, msg);
            moe_mpi_abort_job(3);
            _exit(3);
        }
        int timeout_ms = atomic_load(&daemon->stall_timeout_ms);
        double since = daemon->collective_since, limit = timeout_ms / 1e3;
        if (since > 0 && moe_now() - since > limit) {
            moe_log(MOE_LOG_ERROR, "watchdog",
                    "rank %d has been in one step or collective for %.1f s (scheduler.stall_timeout_ms %d): a "
                    "peer rank died or hangs; aborting the job",
                    daemon->ep.rank, moe_now() - since, timeout_ms);
            moe_mpi_abort_job(3);
            _exit(3);
        }
    }
    return NULL;
}

moe_err_t moe_watchdog_start(moe_daemon_t *daemon) {
    atomic_store(&watchdog_running, 1);
    if (pthread_create(&watchdog_thread, NULL, watchdog_main, daemon) != 0) {
        atomic_store(&watchdog_running, 0);
        return MOE_ERR_INTERNAL;
    }
    return MOE_OK;
}

void moe_watchdog_stop(void) {
    if (!atomic_exchange(&watchdog_running, 0)) return;
    pthread_join(watchdog_thread, NULL);
}

void moe_notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (path == NULL || path[0] == '\0') return;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof addr.sun_path) return;
    memcpy(addr.sun_path, path, len);
    if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0'; /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    if (sendto(fd, state, strlen(state), 0, (struct sockaddr *)&addr,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0)
        moe_log(MOE_LOG_WARN, "systemd", "sd_notify '%s' failed", state);
    close(fd);
}

bool moe_notify_watchdog_enabled(double *interval_s) {
    const char *usec = getenv("WATCHDOG_USEC");
    if (usec == NULL || getenv("NOTIFY_SOCKET") == NULL) return false;
    long long value = strtoll(usec, NULL, 10);
    if (value <= 0) return false;
    *interval_s = (double)value / 1e6;
    return true;
}
