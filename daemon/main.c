/* moed: the MoE serving daemon's entry point (DESIGN §2).
 *   mpirun -np N moed --config FILE    serve (one process per rank)
 *   moed --check-config FILE           validate; print the effective config
 *   moed --print-config-reference      the table of every config field
 * Startup is collective: every rank loads the config and its weights and
 * binds its sockets, and the job starts only if all of them succeeded. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../config/moe_config.h"
#include "../config/moe_heap.h"
#include "../config/moe_log.h"
#include "moe_daemon.h"
#include "moe_mpi_boot.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moed --config FILE           serve (under mpirun -np N for N ranks)\n"
            "       moed --check-config FILE     validate FILE; print the effective config as JSON\n"
            "                                    and exit 0, or print every error and exit 1\n"
            "       moed --print-config-reference   the config fields as a Markdown table\n"
            "       moed --version\n");
}

static int check_config(const char *path) {
    moe_config_t cfg;
    moe_config_errors_t errs;
    if (moe_config_load(path, &cfg, &errs) != MOE_OK) {
        for (int i = 0; i < errs.count; i++) fprintf(stderr, "%s\n", errs.messages[i]);
        fprintf(stderr, "moed: %s: %d error%s\n", path, errs.count, errs.count == 1 ? "" : "s");
        return 1;
    }
    char *json = moe_config_to_json(&cfg);
    if (json == NULL) {
        fprintf(stderr, "moed: out of memory\n");
        return 1;
    }
    printf("%s\n", json);
    free(json);
    return 0;
}

/* True on every rank when ok is true on every rank. */
static bool all_ranks_ok(moe_ep_t ep, bool ok) {
    int value = ok ? 1 : 0;
    if (ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_INT, MPI_MIN, ep.comm);
    return value == 1;
}

static int serve(const char *path, moe_ep_t ep) {
    static moe_daemon_t daemon; /* large (configs); one per process */
    char msg[1024] = "";
    moe_config_errors_t errs;
    int status = 1;
    memset(&daemon, 0, sizeof daemon);
    daemon.ep = ep;
    daemon.started = moe_now();
    snprintf(daemon.config_path, sizeof daemon.config_path, "%s", path);
    bool ok = moe_config_load(path, &daemon.cfg, &errs) == MOE_OK;
    if (!ok && ep.rank == 0)
        for (int i = 0; i < errs.count; i++) fprintf(stderr, "%s\n", errs.messages[i]);
    if (!all_ranks_ok(ep, ok)) return 1;
    moe_log_set_level((moe_log_level_t)daemon.cfg.log.level);
    daemon.io_cfg = daemon.cfg;
    atomic_store(&daemon.stall_timeout_ms, daemon.cfg.scheduler.stall_timeout_ms);
    if (ep.rank == 0)
        moe_log(MOE_LOG_INFO, "main", "moed %s: %d rank%s, backend %s, %d layers of H=%d I=%d E=%d k=%d, loading weights",
                MOED_VERSION, ep.size, ep.size == 1 ? "" : "s", moe_backend_name(daemon.cfg.moe.backend),
                daemon.cfg.model.n_layers, daemon.cfg.model.hidden, daemon.cfg.model.moe_intermediate,
                daemon.cfg.model.experts, daemon.cfg.model.top_k);
    ok = moe_backend_create(&daemon.cfg, ep, &daemon.backend, msg, sizeof msg) == MOE_OK;
    if (!ok) moe_log(MOE_LOG_ERROR, "main", "%s", msg);
    if (!all_ranks_ok(ep, ok)) goto done;
    moe_queue_init(&daemon.inbound);
    pthread_mutex_init(&daemon.outbound_lock, NULL);
    pthread_mutex_init(&daemon.reload_lock, NULL);
    int n_slots = daemon.backend.ops->slot_count(daemon.backend.state);
    ok = moe_stats_init(&daemon.stats, &daemon.cfg, ep.size, n_slots, daemon.backend.ops->placement,
                        daemon.backend.state) == MOE_OK;
    if (ok && daemon.backend.ops->gemm != NULL)
        moe_stats_set_gemm(&daemon.stats, daemon.backend.ops->gemm(daemon.backend.state));
    if (ok) {
        ok = moe_server_start(&daemon, msg, sizeof msg) == MOE_OK;
        if (!ok) moe_log(MOE_LOG_ERROR, "main", "%s", msg);
    }
    if (!all_ranks_ok(ep, ok)) {
        /* this rank's server may be up while another's failed: stop it */
        if (ok) moe_server_stop(&daemon);
        moe_server_join(&daemon);
        goto cleanup;
    }
    if (ep.rank == 0) {
        moe_log(MOE_LOG_INFO, "main", "ready: data on %s%s, control on %s%s%s", daemon.cfg.serve.data,
                strncmp(daemon.cfg.serve.data, "unix:", 5) == 0 ? "" : " (+rank)", daemon.cfg.serve.control,
                daemon.cfg.serve.metrics[0] ? ", metrics on " : "", daemon.cfg.serve.metrics);
        moe_notify("READY=1");
    }
    moe_watchdog_start(&daemon);
    moe_err_t err = moe_scheduler_run(&daemon);
    moe_watchdog_stop();
    if (ep.rank == 0) moe_notify("STOPPING=1");
    moe_server_stop(&daemon);
    moe_server_join(&daemon);
    if (err != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "main", "the step loop failed (%s); exiting", moe_strerror(err));
        moe_mpi_abort_job(1);
    } else {
        if (ep.rank == 0) moe_log(MOE_LOG_INFO, "main", "drained; every rank exits");
        status = 0;
    }
cleanup:
    moe_stats_destroy(&daemon.stats);
    moe_queue_destroy(&daemon.inbound);
    free(daemon.pending_config);
    pthread_mutex_destroy(&daemon.outbound_lock);
    pthread_mutex_destroy(&daemon.reload_lock);
done:
    moe_backend_destroy(&daemon.backend);
    return status;
}

int main(int argc, char **argv) {
    moe_heap_keep_large_buffers(); /* before MPI, libuv or CUDA start threads */
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 'k'},
        {"print-config-reference", no_argument, NULL, 'r'},
        {"version", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *config = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:h", options, NULL)) != -1) {
        switch (opt) {
        case 'c': config = optarg; break;
        case 'k': return check_config(optarg);
        case 'r': moe_config_print_reference(stdout); return 0;
        case 'v': printf("moed %s\n", MOED_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (config == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    moe_ep_t ep;
    char msg[256];
    if (moe_mpi_boot(&argc, &argv, &ep, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "moed: %s\n", msg);
        return 1;
    }
    moe_log_set_rank(ep.rank);
    int status = serve(config, ep);
    moe_mpi_shutdown();
    return status;
}
