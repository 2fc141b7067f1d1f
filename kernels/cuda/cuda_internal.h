/* cuda_internal: the CUDA engine's state and kernel launchers, shared by
 * its own files only (cuda_engine.cu: build, weights, NCCL; cuda_forward.cu:
 * the chunk pipeline; cuda_experts.cu: the expert stage; cuda_grouped.cu:
 * moed's grouped GEMM (mma.sync) and the grouping of entries by slot;
 * cuda_wgmma.cu: its wgmma form (sm_90); cuda_decode.cu: its decode form
 * (few rows: one warp per weight row); cuda_autotune.cu: moe.gemm and
 * moe.comm tuning;
 * cuda_eplb.cu: slot tables and migration; cuda_kernels.cu: the other
 * kernels and their launchers). */
#ifndef MOE_CUDA_INTERNAL_H
#define MOE_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

/* The project's C headers, with C linkage (the system headers they include
 * are already in, above, with their own C++ handling). */
extern "C" {
#include "../../config/moe_log.h"
#include "../moe_route_token.h"
#include "../moe_routing.h"
#include "../moe_slots.h"
#include "../moe_task.h"
#include "moe_cuda.h"
}

typedef __nv_bfloat16 bf16;

/* Wrap every foreign call (STYLE 3): log-ready message with file:line, the
 * sticky CUDA error cleared, and return. */
#define MOE_CUDA_TRY(call)                                                                      \
    do {                                                                                        \
        cudaError_t moe_e_ = (call);                                                            \
        if (moe_e_ != cudaSuccess) {                                                            \
            (void)cudaGetLastError();                                                           \
            return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "%s:%d: %s: %s", __FILE__, __LINE__, \
                               #call, cudaGetErrorString(moe_e_));                              \
        }                                                                                       \
    } while (0)

#define MOE_CUBLAS_TRY(call)                                                                    \
    do {                                                                                        \
        cublasStatus_t moe_s_ = (call);                                                         \
        if (moe_s_ != CUBLAS_STATUS_SUCCESS)                                                    \
            return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "%s:%d: %s: cuBLAS status %d (%s)", \
                               __FILE__, __LINE__, #call, (int)moe_s_, cublasGetStatusString(moe_s_)); \
    } while (0)

#define MOE_NCCL_TRY(call)                                                                      \
    do {                                                                                        \
        ncclResult_t moe_r_ = (call);                                                           \
        if (moe_r_ != ncclSuccess)                                                              \
            return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "%s:%d: %s: NCCL: %s", __FILE__, __LINE__, \
                               #call, ncclGetErrorString(moe_r_));                              \
    } while (0)

/* The same inside ncclGroupStart .. ncclGroupEnd: the group is closed
 * before the error returns. */
#define MOE_NCCL_GROUP_TRY(call)                                                                \
    do {                                                                                        \
        ncclResult_t moe_r_ = (call);                                                           \
        if (moe_r_ != ncclSuccess) {                                                            \
            (void)ncclGroupEnd();                                                               \
            return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "%s:%d: %s: NCCL: %s", __FILE__, __LINE__, \
                               #call, ncclGetErrorString(moe_r_));                              \
        }                                                                                       \
    } while (0)

/* Propagates a moe_err_t from a helper (its message is already in msg). */
#define MOE_TRY(call)                            \
    do {                                         \
        moe_err_t moe_t_ = (call);               \
        if (moe_t_ != MOE_OK) return moe_t_;     \
    } while (0)

/* A grow-only device (or pinned host) buffer: a steady-state step allocates
 * nothing. */
typedef struct {
    void *ptr;
    size_t size;
    bool host; /* pinned host memory */
} cuda_buffer_t;

typedef struct {
    int layer;
    moe_slot_table_t *slots;   /* this layer's placement (host), changed by migration */
    moe_slot_table_t *d_slots; /* the same on the device */
    bf16 *router;      /* [E, H] */
    float *bias;       /* [E] (sigmoid_group_topk) or NULL */
    bf16 *w13;         /* [slots_per_rank, 2I, H]: gate rows, then up rows */
    bf16 *w2;          /* [slots_per_rank, H, I] */
    bf16 *shared_w13;  /* [2Is, H] or NULL */
    bf16 *shared_w2;   /* [H, Is] */
    float *shared_gate; /* [H] or NULL */
    uint64_t step;
} cuda_layer_t;

/* The buffers of one chunk in flight. Two sets: with moe.chunking.overlap
 * chunk i+1's routing and dispatch (aux stream) fill one set while chunk
 * i's experts (main stream) read the other. */
typedef struct {
    cuda_buffer_t ids, weights, logits, entry_slot, flags, scan, counts, send_rows, send_meta, recv_rows,
        recv_meta, partial, back, cub_temp, host_ids, host_weights, eflags, escan;
} cuda_chunk_ws_t;

typedef struct {
    cuda_chunk_ws_t chunk[2];
    cuda_buffer_t x, x_f32, hist, vals_sorted, inverse, slot_counts, gathered, h13, act, y, out, out_bf16,
        shared_h13, shared_act, shared_y, gate, cub_temp, host_counts, host_x, host_out, host_stats,
        gemm_ptrs, host_gemm_ptrs, plan, entry_valid, entry_pos;
} cuda_workspace_t;

/* Expert-GEMM implementations (moe.gemm): cuBLAS (host-side group sizes,
 * one sync per chunk) or moed's own grouped kernel (cuda_grouped.cu). */
typedef enum { MOE_IMPL_CUBLAS = 0, MOE_IMPL_GROUPED = 1, MOE_IMPL_COUNT } moe_gemm_impl_t;

/* Token-count buckets of the GEMM table: bucket b holds 2^(b-1) < rows <=
 * 2^b received rows (bucket 0: one row; rows 0 use bucket 0). */
#define MOE_GEMM_BUCKETS 25

/* A step's events per buffer set (engine->ev[set][...]). */
enum { EV_FRONT = 0, EV_EXPERTS, EV_COMBINE, EV_FINISH, EV_COUNTED, EV_COUNT };

/* One layer's step of one token count as a CUDA graph (cuda_graph.cu). */
typedef struct {
    cudaGraphExec_t exec;        /* NULL: not captured (yet) */
    uint64_t epoch;              /* moe_cuda_graph_epoch when the entry was last reset */
    const void *x, *out;         /* the step's device input and output it was captured with */
    bool counting;               /* with the EPLB slot counting */
    bool failed;                 /* its capture failed in this epoch */
    int runs;                    /* steps run uncaptured in this epoch */
    int tokens;
    long long grouped_runs[4];   /* what one launch adds to engine->grouped_runs */
    long long shared_runs[2];    /* and to engine->shared_runs */
} cuda_graph_t;

/* Per-phase CUDA events of one chunk, when MOE_CUDA_PROFILE is set. */
#define MOE_CUDA_PHASES 8
typedef struct {
    bool on;
    cudaEvent_t marks[MOE_CUDA_PHASES + 1];
    double ms[MOE_CUDA_PHASES]; /* summed over recorded chunks */
    long chunks;
} cuda_profile_t;

/* One routed (token, expert) entry as it travels to the expert's rank. */
typedef struct {
    int32_t local_slot; /* -1: the expert lives on another rank */
    float weight;
} cuda_meta_t;

struct moe_cuda_engine {
    moe_config_t cfg;
    moe_ep_t ep;
    moe_slot_table_t slots; /* the configured placement (sizes; layers start from it or the placement file) */
    int device;
    int local_rank, local_ranks; /* this rank among the ranks of its node */
    char device_name[160];
    cudaStream_t stream;      /* main: experts, shared expert, finalize */
    cudaStream_t aux;         /* aux_chunk: routing, dispatch and combine of chunks (every NCCL call of a step) */
    cublasHandle_t cublas;    /* on stream */
    cublasHandle_t cublas_aux; /* on aux (the router GEMM) */
    cudaStream_t balancer;    /* aux_balancer: EPLB counting */
    cudaStream_t migration_stream; /* EPLB weight loads (their own, so counting never waits for them) */
    struct {                  /* an EPLB migration in flight (moe_cuda_migrate_begin .. _end) */
        bool active;
        moe_task_t task;
        cuda_layer_t *layer;
        moe_slot_table_t *table;
        bf16 *w13, *w2;
        int64_t bytes;
    } migration;
    cudaEvent_t ev_begin, ev[2][EV_COUNT]; /* per buffer set: EV_FRONT .. EV_COUNTED */
    cudaEvent_t ev_input;           /* a forward's input is on the device (its host copy may be reused) */
    unsigned long long *d_step_counts; /* [n_slots] (token, expert) entries per slot this step, on balancer */
    bool counting;                     /* this step counts (a trace asked for slot counts) */
    bool shared_small; /* the shared expert of a few tokens by cuda_shared.cu (MOE_CUDA_SHARED_SMALL, default 1) */
    long long shared_runs[2]; /* chunks' shared experts: [0] cuBLAS, [1] cuda_shared.cu (tests; graphs count their launches) */
    int64_t comm_bytes;                /* bytes this rank sent to other ranks (dispatch, combine), for moe-bench */
    bool exact;                        /* moe.combine exact with more than one rank (cuda_exact.cu) */
    int *rank_counts;          /* [2][8·R]: send/recv counts and offsets per buffer set, rows then entries */
    ncclComm_t comm;          /* token traffic */
    ncclComm_t comm_balancer; /* EPLB statistics (its own, so collectives never interleave) */
    bool have_comm;
    int n_layers;
    cuda_layer_t *layers;
    double *d_zipf_cdf;
    bool grouped_gemm;   /* cublasGemmGroupedBatchedEx works here (else one call per slot) */
    bool own_grouped_ok; /* moed's grouped kernel can run this model here */
    bool wgmma_ok;       /* and its wgmma form for many rows per slot (sm_90) */
    int wgmma_min_rows;  /* grouped uses wgmma from this many entries per slot on average (MOE_CUDA_WGMMA_MIN_ROWS) */
    int wgmma_bn;        /* weight rows per wgmma work item: 64, 128, 256, or 0 = by size (MOE_CUDA_WGMMA_BN) */
    bool wgmma_ws;       /* wgmma in its warp-specialised form (MOE_CUDA_WGMMA_WS, where it can run) */
    int wgmma_order;     /* its items' order: MOE_WGMMA_ORDER_* (MOE_CUDA_WGMMA_ORDER auto|tile|weight) */
    bool pdl;            /* programmatic dependent launch on the decode chain (sm_90; MOE_CUDA_NO_PDL: off) */
    int decode_rows;     /* grouped's decode form up to this many received rows (MOE_CUDA_DECODE_ROWS; 0: never;
                            -1, unset: while the entries stay under half the slots, moe_cuda_use_decode) */
    long long grouped_runs[4]; /* expert stages run by the grouped GEMM: [0] mma.sync, [1] wgmma, [2] decode,
                                  [3] of [1] the warp-specialised form (tests) */
    bool poison_out;           /* MOE_CUDA_POISON_OUTPUT (tests): NaN in the device output before each forward */
    int cc_major;
    size_t max_smem;     /* opt-in shared memory per block */
    size_t l2_bytes;     /* the GPU's L2 cache */
    moe_gemm_impl_t gemm_table[MOE_GEMM_BUCKETS]; /* implementation per bucket (moe.gemm) */
    double tune_ms[MOE_GEMM_BUCKETS][MOE_IMPL_COUNT]; /* the autotuner's timings; 0 = not timed */
    bool tuned;              /* gemm_table came from the autotuner (or its cache) */
    int allgather_max_tokens; /* moe.comm: chunks with at most this many tokens on every rank use allgather */
    char gemm_text[1024];    /* the table as text, for logs, stats and moe-bench */
    int grouped_min_slots; /* use it only with more local slots than this (16; 0 with MOE_CUDA_FORCE_GROUPED) */
    cuda_profile_t profile;
    cuda_workspace_t ws;
    struct {                 /* small steps as CUDA graphs (cuda_graph.cu) */
        cuda_graph_t *entry; /* [n_layers][max_tokens] */
        int max_tokens;      /* MOE_CUDA_GRAPH_TOKENS (16; 0: none) */
        uint64_t epoch;      /* bumped by what a graph may have baked in: reload, migration, slot tables */
        long long captured, launched;
    } graphs;
};

/* Returns the buffer grown to at least `bytes` (contents not kept), or NULL
 * with msg set (also for growth inside a graph capture). */
void *moe_cuda_reserve(cuda_buffer_t *buffer, size_t bytes, char *msg, size_t msg_size);

/* CUDA graphs of small steps (cuda_graph.cu). A step function runs one
 * layer's step on the main stream (it may be captured). */
typedef moe_err_t (*moe_cuda_step_fn_t)(void *ctx, char *msg, size_t msg_size);
moe_err_t moe_cuda_graph_init(moe_cuda_engine_t *engine, int max_tokens, char *msg, size_t msg_size);
void moe_cuda_graph_destroy(moe_cuda_engine_t *engine);
/* Every graph captured so far goes stale (what it baked in changed). */
void moe_cuda_graph_invalidate(moe_cuda_engine_t *engine);
/* The engine's graph epoch: its own plus every workspace move. */
uint64_t moe_cuda_graph_epoch(const moe_cuda_engine_t *engine);
/* moe_cuda_reserve moved a buffer (every graph goes stale). */
void moe_cuda_count_reserve_move(void);
/* This thread is capturing a step: no allocation, and no wait on events
 * recorded outside the capture. */
bool moe_cuda_is_capturing(void);
/* Runs step(ctx), the step of `n_tokens` (1 .. graphs.max_tokens) tokens
 * of layer L (one of engine->layers) from device input x into device
 * output out: as usual, or captured and launched as a graph, or by
 * launching the graph captured before; L->step counts a launched one. */
moe_err_t moe_cuda_graph_run(moe_cuda_engine_t *engine, cuda_layer_t *L, int n_tokens, const void *x,
                             const void *out, moe_cuda_step_fn_t step, void *ctx, char *msg, size_t msg_size);

/* One chunk of the forward on device-resident bf16 input, on the main
 * stream only (cuda_forward.cu): T tokens here, chunk_max the most any rank
 * has in this chunk (the same on every rank: it picks the exchange,
 * moe.comm). comm_only skips the expert math (zeros): moe.comm auto's
 * timing. */
moe_err_t moe_cuda_forward_chunk(moe_cuda_engine_t *engine, cuda_layer_t *layer, const bf16 *x, int T, int chunk_max,
                                 const int32_t *ids_host_routed, const float *weights_host_routed, float *out,
                                 bool comm_only, char *msg, size_t msg_size);

/* EPLB (cuda_eplb.cu): the per-layer slot tables at startup (the
 * configured placement, or eplb.placement_file), and a layer's migration
 * to a new placement. */
moe_err_t moe_cuda_layer_slots(moe_cuda_engine_t *engine, cuda_layer_t *layer, const int *placement, char *msg,
                               size_t msg_size);

/* Sets engine->allgather_max_tokens from moe.comm (auto, with more than
 * one rank: times both exchanges without expert math on 1..1024 tokens per
 * rank; collective; every rank gets the same threshold). */
moe_err_t moe_cuda_tune_comm(moe_cuda_engine_t *engine, char *msg, size_t msg_size);

/* The expert stage of a chunk on the main stream (cuda_experts.cu): n_recv
 * received rows [n_recv, H] with their k entries each -> partial [n_recv,
 * H] (Σ over a row's local entries of weight · expert output, bf16), with
 * implementation `impl`; or, with partial NULL, out [n_recv, H] in float32
 * (one rank, rows = tokens, no shared expert: the layer's output); or,
 * with entry_pos (the exact combine), partial [valid entries, H] holds each
 * valid entry p's unweighted output at row entry_pos[p] (a tiled form:
 * never the decode form). */
moe_err_t moe_cuda_experts(moe_cuda_engine_t *engine, cuda_layer_t *layer, moe_gemm_impl_t impl,
                           const bf16 *recv_rows, const cuda_meta_t *recv_meta, int n_recv, bf16 *partial,
                           float *out, const int32_t *entry_pos, char *msg, size_t msg_size);

/* y[n, N] = x[n, K] · W[N, K]ᵀ with cuBLAS (bf16 operands, f32
 * accumulation; y f32 or bf16 by y_type) on the handle's stream. */
moe_err_t moe_cuda_gemm(cublasHandle_t handle, int N, int n, int K, const bf16 *W, const bf16 *x, void *y,
                        cudaDataType_t y_type, char *msg, size_t msg_size);

/* Device -> pinned staging -> dst, waiting for `stream` (small counts). */
moe_err_t moe_cuda_fetch(moe_cuda_engine_t *engine, cudaStream_t stream, void *dst, const void *src, size_t bytes,
                         char *msg, size_t msg_size);

/* Records the end of profile phase `phase` on the main stream (MOE_CUDA_PROFILE). */
void moe_cuda_mark(moe_cuda_engine_t *engine, int phase);

/* The bucket of a chunk receiving `rows` rows. */
int moe_cuda_bucket(int rows);

/* Fills engine->gemm_table from moe.gemm: cublas or grouped everywhere, or
 * (auto) from the cache file or by timing both on this rank's own experts
 * (cuda_autotune.cu). Also writes engine->gemm_text. */
moe_err_t moe_cuda_autotune(moe_cuda_engine_t *engine, char *msg, size_t msg_size);

/* moed's grouped GEMM (cuda_grouped.cu). */
bool moe_cuda_grouped_supported(int hidden, int inter, int cc_major, size_t max_smem, char *why, size_t why_size);
int moe_cuda_grouped_tile_rows(int n_entries, int S, size_t max_smem);
/* Groups the entries by local slot (meta[p].local_slot; -1: elsewhere):
 * slot_counts, plan (row offsets and tile starts, tiles of tile_rows),
 * order[pos] = entry, inverse[entry] = pos. hist is scratch of
 * moe_cuda_group_hist_ints ints (0 for few entries: one launch; else two,
 * counts by CTA, then plan and scatter). */
size_t moe_cuda_group_hist_ints(int n_entries, int S);
cudaError_t moe_cuda_group_entries_launch(const cuda_meta_t *meta, int n_entries, int S, int tile_rows, int32_t *hist,
                                          int32_t *slot_counts, int32_t *plan, int32_t *order, int32_t *inverse,
                                          cudaStream_t stream);
cudaError_t moe_cuda_grouped_gemm_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                         const int32_t *plan, int S, int tile_rows, bool swiglu, int n_out, int K,
                                         int n_entries, bf16 *out, cudaStream_t stream);

/* 16 bytes global -> shared (a shared-space address), asynchronously;
 * zeros when !ok (src-size 0; src must still be a valid address). .cg:
 * through L2 only — operands stream. Groups: commit, then wait until at
 * most N of this thread's groups are pending. */
__device__ __forceinline__ void moe_cuda_copy16(uint32_t smem, const bf16 *src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void moe_cuda_copy_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void moe_cuda_copy_wait() { /* no shared-memory read moves above it */
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Programmatic dependent launch (sm_90; nothing on older GPUs): a kernel
 * launched with moe_cuda_launch(pdl = true, ...) may start while the one
 * before it in the stream finishes, so it must call moe_cuda_grid_wait()
 * before it reads anything an earlier kernel wrote (the wait returns once
 * the previous grid has completed and its writes are visible), and calls
 * moe_cuda_grid_release() after it to let the next one start early. Used
 * on the decode chain (router, routing, expert kernels), where each kernel
 * lasts a few microseconds and launch gaps are a large part of a step. */
__device__ __forceinline__ void moe_cuda_grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void moe_cuda_grid_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
template <typename... Params, typename... Args>
static inline cudaError_t moe_cuda_launch(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                          cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem, config.stream = stream;
    config.attrs = &attr, config.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&config, kernel, args...);
    if (e != cudaSuccess) (void)cudaGetLastError(); /* returned here, not left for the next launcher */
    return e;
}
/* Whether the PDL kernels of cuda_decode.cu, cuda_kernels.cu and
 * cuda_shared.cu were compiled for sm_90 or later (a compute_80 build
 * JIT-compiled on an H200 has no griddepcontrol: its kernels must not be
 * launched with PDL); each asks moe_cuda_built_for_sm90 about its own. */
template <typename... Kernels>
static inline bool moe_cuda_built_for_sm90(Kernels... kernels) {
    bool ok = true;
    auto check = [&ok](const void *kernel) {
        cudaFuncAttributes a;
        if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
            (void)cudaGetLastError();
            ok = false;
        } else if (a.ptxVersion < 90) {
            ok = false;
        }
    };
    (check((const void *)kernels), ...);
    return ok;
}
bool moe_cuda_decode_pdl_built(void);
bool moe_cuda_route_pdl_built(void);
bool moe_cuda_shared_pdl_built(void);

/* An upper bound of a grouping plan's tiles of tile_rows rows before the
 * counts are known (host side): one partial tile per used slot plus the
 * full ones. */
static inline long moe_cuda_tile_bound(int n_entries, int S, int tile_rows) {
    return (long)(n_entries < S ? n_entries : S) + n_entries / tile_rows;
}

/* SwiGLU's silu(gate)·up in float for every CUDA kernel: __expf and a
 * fast division, two MUFU operations and a few ulp (the result is then
 * rounded to bf16, 2^-8 relative). The accurate expf and IEEE division
 * are some 20 instructions per value, issued while the tensor cores idle
 * in the wgmma gate/up epilogue. Gates below about -87 give ±0 (1 +
 * e^-gate past 2^126, where the fast division returns 0; the exact value
 * is below 1e-36 there). */
__device__ __forceinline__ float moe_cuda_swiglu(float gate, float up) {
    return __fdividef(gate, 1.0f + __expf(-gate)) * up;
}

/* The work tile `tile` of a grouping plan (plan[0..S]: row offsets,
 * plan[S+1..2S+1]: first tile of each slot): its slot (the last slot whose
 * first tile is <= tile, so never an empty one), by binary search. */
__device__ __forceinline__ int moe_cuda_tile_slot(const int32_t *plan, int S, int tile) {
    const int32_t *tiles = plan + S + 1;
    int lo = 0, hi = S - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tiles[mid] <= tile) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* moed's wgmma grouped GEMM for many rows per slot (cuda_wgmma.cu, sm_90
 * only): the same plan as the grouped kernel's with MOE_WGMMA_TILE_ROWS-row
 * tiles, and bn (64, 128 or 256; 0: chosen by size) weight rows per work item. */
#define MOE_WGMMA_TILE_ROWS 128
/* Whether the wgmma kernels load on this GPU and fit its shared memory (the
 * shape checks are moe_cuda_grouped_supported's). */
bool moe_cuda_wgmma_supported(size_t max_smem, char *why, size_t why_size);
/* ws: the warp-specialised form (cuda_wgmma_ws.cu), where
 * moe_cuda_wgmma_ws_supported() says it can run, with its items in `order`
 * (MOE_WGMMA_ORDER_*; the classic form: always by row tile). */
enum { MOE_WGMMA_ORDER_AUTO = 0, MOE_WGMMA_ORDER_TILE = 1, MOE_WGMMA_ORDER_WEIGHT = 2 };
cudaError_t moe_cuda_wgmma_gemm_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                       const int32_t *plan, int S, bool swiglu, int n_out, int K, int n_entries,
                                       int bn, bool ws, int order, bf16 *out, cudaStream_t stream);
/* The warp-specialised form: its kernels load on this GPU and the driver
 * encodes tensor maps. Its launch takes the checked arguments and the
 * width chosen by moe_cuda_wgmma_gemm_launch. */
bool moe_cuda_wgmma_ws_supported(void);
cudaError_t moe_cuda_wgmma_ws_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                     const int32_t *plan, int S, bool swiglu, int n_out, int K, int n_entries, int bn,
                                     int sms, int order, bf16 *out, cudaStream_t stream);

/* moed's grouped GEMM in its decode form (cuda_decode.cu), by row, with
 * no grouping: act [n_rows·k, I] (scratch), then into partial [n_rows, H]
 * (bf16) or, with partial NULL, out (f32) the weighted per-row sums, as
 * moe_cuda_experts promises. */
cudaError_t moe_cuda_decode_launch(const bf16 *W13, const bf16 *W2, const bf16 *rows, const cuda_meta_t *meta,
                                   int n_rows, int top_k, int S, int H, int I, size_t l2_bytes, bf16 *act,
                                   bf16 *partial, float *out, bool pdl, cudaStream_t stream);
/* Whether a chunk of n_rows received rows takes the decode form. */
bool moe_cuda_use_decode(const moe_cuda_engine_t *engine, int n_rows);
#define MOE_CUDA_DECODE_MAX_ROWS 65535 /* a grid dimension */
/* logits [T, E] = x [T, H] · router [E, H]ᵀ (f32) for T <=
 * MOE_CUDA_ROUTER_MAX_TOKENS (cuda_decode.cu; cuBLAS for more). */
#define MOE_CUDA_ROUTER_MAX_TOKENS 16
cudaError_t moe_cuda_router_launch(const bf16 *router, const bf16 *x, int T, int E, int H, float *logits, bool pdl,
                                   cudaStream_t stream);

/* The shared expert of T <= MOE_CUDA_SHARED_SMALL_TOKENS tokens
 * (cuda_shared.cu; cuBLAS for more): act [T, Is] (scratch), y [T, H] (f32)
 * = the shared expert of x [T, H], as finish()'s cuBLAS path computes it. */
#define MOE_CUDA_SHARED_SMALL_TOKENS 2
bool moe_cuda_shared_small_ok(int T, int H, int Is);
cudaError_t moe_cuda_shared_small_launch(const bf16 *W13, const bf16 *W2, const bf16 *x, int T, int H, int Is,
                                         bf16 *act, float *y, bool pdl, cudaStream_t stream);

/* Launchers (cuda_kernels.cu): each checks its arguments, sizes its grid,
 * launches on `stream` and returns cudaGetLastError(). */
cudaError_t moe_cuda_f32_to_bf16_launch(const float *src, bf16 *dst, size_t n, cudaStream_t stream);
cudaError_t moe_cuda_synth_launch(bf16 *dst_bf16, float *dst_f32, size_t n, uint64_t seed, int layer, int kind,
                                  int expert, int fan_in, size_t index_offset, cudaStream_t stream);
/* With local_slots (one rank): also entry_slot and meta of every entry,
 * as moe_cuda_mark_local_launch writes them (in the same launch where the
 * method allows). */
cudaError_t moe_cuda_route_launch(const moe_route_token_params_t *params, const float *logits, const float *bias,
                                  const double *zipf_cdf, uint64_t step, int64_t first_token, int n_tokens,
                                  int32_t *ids, float *weights, const moe_slot_table_t *local_slots,
                                  int32_t *entry_slot, cuda_meta_t *meta, bool pdl, cudaStream_t stream);
cudaError_t moe_cuda_mark_launch(const moe_slot_table_t *slots, const int32_t *ids, int n_tokens, int top_k,
                                 int rank, int n_ranks, int64_t first_token, int32_t *entry_slot, int32_t *flags,
                                 cudaStream_t stream);
/* One rank (no exchange): entry_slot and meta (slot, weight) of every entry. */
cudaError_t moe_cuda_mark_local_launch(const moe_slot_table_t *slots, const int32_t *ids, const float *weights,
                                       int n_tokens, int top_k, int64_t first_token, int32_t *entry_slot,
                                       cuda_meta_t *meta, cudaStream_t stream);
cudaError_t moe_cuda_counts_launch(const int32_t *flags, const int32_t *scan, int n_tokens, int n_ranks,
                                   int32_t *counts, cudaStream_t stream);
cudaError_t moe_cuda_pack_launch(const bf16 *x, const int32_t *entry_slot, const float *weights,
                                 const int32_t *flags, const int32_t *scan, int n_tokens, int hidden, int top_k,
                                 int n_ranks, int slots_per_rank, bf16 *send_rows, cuda_meta_t *send_meta,
                                 cudaStream_t stream);
cudaError_t moe_cuda_gather_launch(const bf16 *rows, const int32_t *vals_sorted, int n_valid, int hidden,
                                   int top_k, bf16 *gathered, cudaStream_t stream);
cudaError_t moe_cuda_swiglu_launch(const float *h13, int n_rows, int inter, bf16 *act, cudaStream_t stream);
cudaError_t moe_cuda_swiglu_bf16_launch(const bf16 *h13, int n_rows, int inter, bf16 *act, cudaStream_t stream);
/* partial (bf16) or, with partial NULL, out (float32, the same rounded values). */
cudaError_t moe_cuda_reduce_launch(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse, int n_rows,
                                   int hidden, int top_k, bf16 *partial, float *out, cudaStream_t stream);
cudaError_t moe_cuda_gate_launch(const bf16 *x, const float *gate, int n_tokens, int hidden, float *gate_out,
                                 cudaStream_t stream);
cudaError_t moe_cuda_finalize_launch(const bf16 *back, const int32_t *flags, const int32_t *scan, int n_tokens,
                                     int hidden, int n_ranks, const float *shared_y, const float *gate,
                                     float *out, cudaStream_t stream);
/* The exact combine (cuda_exact.cu): entry flags per destination rank, the
 * received entries' validity, the per-entry rows that go back, and the
 * token-side sum in entry order. */
cudaError_t moe_cuda_entry_flags_launch(const int32_t *entry_slot, int n_entries, int slots_per_rank, int n_ranks,
                                        int32_t *eflags, cudaStream_t stream);
cudaError_t moe_cuda_entry_valid_launch(const cuda_meta_t *meta, int n_entries, int32_t *valid, cudaStream_t stream);
cudaError_t moe_cuda_entry_rows_launch(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse,
                                       const int32_t *pos, int n_entries, int hidden, bf16 *dst, cudaStream_t stream);
cudaError_t moe_cuda_finalize_entries_launch(const bf16 *back, const int32_t *entry_slot, const int32_t *escan,
                                             const float *weights, int n_tokens, int top_k, int slots_per_rank,
                                             int hidden, const float *shared_y, const float *gate, float *out,
                                             cudaStream_t stream);
/* own_meta[t, i] = (global slot, weight) for t < T; (-1, 0) for the
 * padding rows T..Ta (moe.comm allgather). */
cudaError_t moe_cuda_allgather_meta_launch(const int32_t *entry_slot, const float *weights, int T, int Ta, int top_k,
                                           cuda_meta_t *own_meta, cudaStream_t stream);
/* Global slots -> this rank's local slot, or -1 (weight 0) elsewhere. */
cudaError_t moe_cuda_localize_meta_launch(cuda_meta_t *meta, size_t n, int rank, int slots_per_rank,
                                          cudaStream_t stream);
/* counts[slot] += the entries with that slot (n_slots counters: the EPLB statistics). */
cudaError_t moe_cuda_slot_stats_launch(const int32_t *entry_slot, int n_entries, int n_slots,
                                       unsigned long long *counts, cudaStream_t stream);

#endif
