/* moe_backend: the one interface the step loop calls (DESIGN §1, §5). A
 * backend is a table row of function pointers chosen at startup from
 * moe.backend, so the daemon never tests which backend it runs. Rows: cpu
 * (always built); cuda (only in a CUDA build). */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "../config/moe_config.h"
#include "cpu/moe_cpu.h"
#include "moe_ep.h"
#include "moe_task.h"

typedef struct {
    const char *name;
    moe_backend_kind_t kind;
    moe_err_t (*create)(const moe_config_t *cfg, moe_ep_t ep, void **state, char *msg,
                        size_t msg_size);
    /* Collective over the ranks. MOE_ERR_INVAL: the step was refused
     * before the ranks agreed on it (this rank's or another's input, or
     * memory to prepare it), on every rank alike, and serving goes on; any
     * other error came after the agreement and may have left other ranks
     * inside a collective (the step loop then ends the job). */
    moe_err_t (*forward)(void *state, int layer, const float *x, int n_tokens,
                         const int32_t *routed_ids, const float *routed_weights, float *out,
                         moe_route_trace_t *trace, char *msg, size_t msg_size);
    void (*reconfigure)(void *state, const moe_config_t *cfg);
    int (*slot_count)(const void *state);
    const int *(*placement)(const void *state, int layer);
    /* EPLB in two halves, so that serving goes on while weights load:
     * migrate_begin checks a new placement for one layer and starts filling
     * shadow slots in the background (one migration at a time); every rank
     * calls it at the same step boundary. migrate_poll: MOE_TASK_RUNNING,
     * _DONE or _FAILED, without waiting. migrate_end waits, then swaps the
     * placement in (commit, at a step boundary every rank agreed on) or
     * drops it. NULL: this backend cannot migrate; online EPLB is refused. */
    moe_err_t (*migrate_begin)(void *state, int layer, const int *slot_expert, char *msg, size_t msg_size);
    int (*migrate_poll)(void *state);
    moe_err_t (*migrate_end)(void *state, bool commit, int64_t *bytes_loaded, char *msg, size_t msg_size);
    /* Device-timed iterations for moe-bench (NULL: time on the host), and
     * the bytes this rank sent to the other ranks per timed iteration
     * (dispatch and combine; a ring collective's share). */
    moe_err_t (*bench)(void *state, int layer, int n_tokens, int warmup, int iters, double *ms_per_iter,
                       double *comm_bytes, char *msg, size_t msg_size);
    /* For the watchdog thread, while the compute thread runs: MOE_OK, or an
     * asynchronous communication error (NCCL) with its message; then the
     * communicators are aborted. NULL: nothing to check (cpu). */
    moe_err_t (*check)(void *state, char *msg, size_t msg_size);
    /* What runs it ("cpu, 2 threads", "NVIDIA H200, 132 SMs, ..."). */
    const char *(*device)(const void *state);
    /* true: the slot counts a forward returns are summed over every rank
     * already (the same on every rank); false: this rank's own. */
    bool counts_summed;
    /* The expert-GEMM choice per token-count bucket (moe.gemm), as text;
     * NULL: the backend has one implementation (cpu). */
    const char *(*gemm)(const void *state);
    /* Host memory for a step's inputs and outputs that forward moves
     * fastest (cuda: pinned, so the copies to and from the GPU go by DMA
     * straight from it, with no pass through a staging buffer); an error
     * with its message when the driver refuses (plain memory works too,
     * only slower). NULL ops: malloc and free serve as well (cpu). */
    moe_err_t (*host_alloc)(void *state, size_t bytes, void **ptr, char *msg, size_t msg_size);
    void (*host_free)(void *state, void *ptr);
    /* forward with bf16 activations in and out (uint16_t bit patterns): its
     * output is forward's rounded to nearest even (cuda: rounded on the
     * device, half the bytes over PCIe each way; cpu: widened and rounded
     * around its float32 forward, what the edge does for a bf16 request).
     * The step loop uses it for steps of bf16 requests only (a bf16 payload
     * then goes into the step and back as it is). NULL: forward always. */
    moe_err_t (*forward_bf16)(void *state, int layer, const uint16_t *x, int n_tokens, const int32_t *routed_ids,
                              const float *routed_weights, uint16_t *out, moe_route_trace_t *trace, char *msg,
                              size_t msg_size);
    void (*destroy)(void *state);
} moe_backend_ops_t;

typedef struct {
    const moe_backend_ops_t *ops;
    void *state;
} moe_backend_t;

/* Creates the backend cfg->moe.backend names; a backend this build lacks is
 * MOE_ERR_UNSUPPORTED with a message listing the available ones. */
moe_err_t moe_backend_create(const moe_config_t *cfg, moe_ep_t ep, moe_backend_t *out, char *msg,
                             size_t msg_size);
void moe_backend_destroy(moe_backend_t *backend);

/* Comma-separated names of the backends in this build ("cpu" or "cpu, cuda"). */
const char *moe_backend_available(void);

#endif
