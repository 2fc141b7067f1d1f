/* moe_cuda: the CUDA backend (DESIGN §4, §5) — the MoE layer with bf16
 * weights and activations, float32 accumulation and routing, experts on
 * moed's grouped GEMM or cuBLAS (moe.gemm, autotuned), expert parallelism
 * over NCCL (alltoall or allgather, moe.comm), EPLB migration in the
 * background. The same entry points as moe_cpu, so it is one row of the
 * backend table; plain C types only, so C code can include this header.
 * A forward is a collective over the EP group, like the CPU engine's. */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../config/moe_config.h"
#include "../cpu/moe_cpu.h" /* moe_route_trace_t */
#include "../moe_ep.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_cuda_engine moe_cuda_engine_t;

/* Binds GPU (local rank % device count), creates the NCCL communicators
 * (main and balancer; the unique id travels over MPI), checks that the
 * configured expert GEMM can run here, and uploads the weights (synthetic:
 * generated on the device, bit-identical to the CPU backend's float values
 * before rounding to bf16; safetensors: host float32 -> bf16 -> device).
 * No GPU, or a CUDA error: a clear message in msg. */
moe_err_t moe_cuda_create(const moe_config_t *cfg, moe_ep_t ep, moe_cuda_engine_t **out, char *msg,
                          size_t msg_size);
void moe_cuda_destroy(moe_cuda_engine_t *engine);

/* Pinned host memory (portable across devices) for a step's inputs and
 * outputs into *ptr, or MOE_ERR_NOMEM with the driver's reason. Free with
 * moe_cuda_host_free. */
moe_err_t moe_cuda_host_alloc(moe_cuda_engine_t *engine, size_t bytes, void **ptr, char *msg, size_t msg_size);
void moe_cuda_host_free(moe_cuda_engine_t *engine, void *ptr);

/* The layer forward from host float32 to host float32 (what the daemon
 * uses; conversion to bf16 happens on the device). Same contract as
 * moe_cpu_forward. x and out in pinned memory (moe_cuda_host_alloc) go to
 * and from the GPU directly; others pass through pinned staging buffers. */
moe_err_t moe_cuda_forward(moe_cuda_engine_t *engine, int layer, const float *x, int n_tokens,
                           const int32_t *routed_ids, const float *routed_weights, float *out,
                           moe_route_trace_t *trace, char *msg, size_t msg_size);
/* The same with bf16 activations in and out (uint16_t bit patterns):
 * half the bytes each way over PCIe and no conversion kernel for the
 * input; out = the float32 forward's output rounded to nearest even on
 * the device, bit for bit (cuda_layer checks it). The daemon's step
 * buffers take this form. */
moe_err_t moe_cuda_forward_bf16(moe_cuda_engine_t *engine, int layer, const uint16_t *x, int n_tokens,
                                const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                                moe_route_trace_t *trace, char *msg, size_t msg_size);

/* Times `iters` forwards of n_tokens device-resident random tokens per rank
 * (after `warmup` untimed ones) with CUDA events; ms_per_iter receives each
 * iteration's time (the slowest rank's, the same on every rank), and
 * *comm_bytes (when not NULL) the bytes this rank sent to the other ranks
 * per timed iteration. For moe-bench. Collective. */
moe_err_t moe_cuda_bench(moe_cuda_engine_t *engine, int layer, int n_tokens, int warmup, int iters,
                         double *ms_per_iter, double *comm_bytes, char *msg, size_t msg_size);

void moe_cuda_reconfigure(moe_cuda_engine_t *engine, const moe_config_t *cfg);
int moe_cuda_slot_count(const moe_cuda_engine_t *engine);
/* Slot s -> expert of model layer `layer` (n_slots entries), or NULL for a
 * layer not served. */
const int *moe_cuda_placement(const moe_cuda_engine_t *engine, int layer);

/* EPLB: moves layer `layer` to the placement slot_expert (n_slots entries;
 * the same on every rank): this rank's new slots are filled into shadow
 * buffers on the aux_balancer stream (from slots it holds, or from the
 * model: regenerated on the device when synthetic, read from the mmap'd
 * safetensors otherwise), then swapped in. *bytes_loaded: bytes read from
 * the model. Call between forwards. On error the old placement stays. */
moe_err_t moe_cuda_migrate(moe_cuda_engine_t *engine, int layer, const int *slot_expert, int64_t *bytes_loaded,
                           char *msg, size_t msg_size);

/* The same in two halves, so that serving goes on while weights load:
 * begin checks the placement, allocates the shadow buffers and fills them
 * from a background thread on a stream of its own (forwards keep the
 * current placement meanwhile); poll returns MOE_TASK_RUNNING, _DONE or
 * _FAILED without waiting; end waits and swaps in (commit, between
 * forwards) or frees the shadow. */
moe_err_t moe_cuda_migrate_begin(moe_cuda_engine_t *engine, int layer, const int *slot_expert, char *msg,
                                 size_t msg_size);
int moe_cuda_migrate_poll(moe_cuda_engine_t *engine);
moe_err_t moe_cuda_migrate_end(moe_cuda_engine_t *engine, bool commit, int64_t *bytes_loaded, char *msg,
                               size_t msg_size);

/* Polls the NCCL communicators for an asynchronous error (safe from another
 * thread: the watchdog's); on one, aborts them (so a rank stuck in a
 * collective returns) and returns MOE_ERR_MPI with NCCL's message. */
moe_err_t moe_cuda_check(moe_cuda_engine_t *engine, char *msg, size_t msg_size);

/* The expert-GEMM implementation per token-count bucket (moe.gemm), as
 * text: "auto (tuned): 1-64 rows grouped, 65-16384 rows cublas". */
const char *moe_cuda_gemm_table(const moe_cuda_engine_t *engine);

/* How many expert stages ran moed's grouped GEMM in each form since the
 * engine started (tests): wgmma (sm_90; *ws of them warp-specialised),
 * mma.sync and decode (few rows); *wgmma_ok: the wgmma form can run on
 * this GPU. */
void moe_cuda_grouped_forms(const moe_cuda_engine_t *engine, long long *wgmma, long long *ws, long long *mma,
                            long long *decode, bool *wgmma_ok);

/* Chunks whose shared expert ran since the engine started (tests): by
 * cuBLAS, and by the small-T kernels (MOE_CUDA_SHARED_SMALL); a graph's
 * launch counts as its step would. */
void moe_cuda_shared_forms(const moe_cuda_engine_t *engine, long long *cublas, long long *small);

/* Steps captured as CUDA graphs, and graph launches, since the engine
 * started (tests, logs). */
void moe_cuda_graph_counts(const moe_cuda_engine_t *engine, long long *captured, long long *launched);

/* "NVIDIA H200, 132 SMs, 139.8 GiB, cc 9.0" */
const char *moe_cuda_device_name(const moe_cuda_engine_t *engine);

#ifdef __cplusplus
}
#endif

#endif
