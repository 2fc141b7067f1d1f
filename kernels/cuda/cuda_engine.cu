/* cuda_engine: builds the CUDA engine — binds the GPU of this rank, the
 * streams, the NCCL communicators (after every rank voted it got that far),
 * each layer's slot table on the device, and the weights of every layer
 * (router, bias, shared expert) and of this rank's slots, as bf16 (biases
 * and gates float32); then the expert-GEMM table (moe.gemm) and the
 * exchange threshold (moe.comm). Synthetic weights are generated on the
 * device from (seed, layer, expert); safetensors go through moe_weights
 * (float32 on the host) and are rounded to bf16 here. */
#include <errno.h>
#include <time.h>

#include "cuda_internal.h"

extern "C" {
#include "../moe_weights.h"
}
#include "../moe_eplb.h"

void *moe_cuda_reserve(cuda_buffer_t *buffer, size_t bytes, char *msg, size_t msg_size) {
    if (bytes == 0) bytes = 16;
    if (buffer->ptr != nullptr && buffer->size >= bytes) return buffer->ptr;
    if (moe_cuda_is_capturing()) { /* cuda_graph.cu: a capture neither allocates nor frees */
        moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: a buffer would grow to %zu bytes inside a graph capture",
                    bytes);
        return nullptr;
    }
    moe_cuda_count_reserve_move();
    size_t grown = buffer->size * 3 / 2 > bytes ? buffer->size * 3 / 2 : bytes;
    if (buffer->ptr != nullptr) {
        if (buffer->host) cudaFreeHost(buffer->ptr);
        else cudaFree(buffer->ptr);
        buffer->ptr = nullptr;
        buffer->size = 0;
    }
    cudaError_t e = buffer->host ? cudaMallocHost(&buffer->ptr, grown) : cudaMalloc(&buffer->ptr, grown);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        buffer->ptr = nullptr;
        moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: cannot allocate %zu bytes (%s): %s", grown,
                    buffer->host ? "pinned host" : "device", cudaGetErrorString(e));
        return nullptr;
    }
    buffer->size = grown;
    return buffer->ptr;
}

static moe_err_t device_alloc(void **ptr, size_t bytes, const char *what, char *msg, size_t msg_size) {
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *ptr = nullptr;
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: cannot allocate %.1f MiB for %s: %s",
                           bytes / 1048576.0, what, cudaGetErrorString(e));
    }
    return MOE_OK;
}

/* Host float32 -> bf16 -> device, through a pinned staging buffer. */
static moe_err_t upload_bf16(moe_cuda_engine_t *engine, bf16 *dst, const float *src, size_t n, char *msg,
                             size_t msg_size) {
    bf16 *staging = (bf16 *)moe_cuda_reserve(&engine->ws.host_x, n * sizeof(bf16), msg, msg_size);
    if (staging == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cudaStreamSynchronize(engine->stream)); /* staging is free again */
    for (size_t i = 0; i < n; i++) staging[i] = __float2bfloat16(src[i]);
    MOE_CUDA_TRY(cudaMemcpyAsync(dst, staging, n * sizeof(bf16), cudaMemcpyHostToDevice, engine->stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(engine->stream));
    return MOE_OK;
}

static moe_err_t upload_f32(moe_cuda_engine_t *engine, float *dst, const float *src, size_t n, char *msg,
                            size_t msg_size) {
    MOE_CUDA_TRY(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyHostToDevice, engine->stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(engine->stream));
    return MOE_OK;
}

/* Synthetic tensor -> device, generated in place. */
static moe_err_t synth(moe_cuda_engine_t *engine, bf16 *dst16, float *dst32, size_t n, int layer, int kind,
                       int expert, int fan_in, char *msg, size_t msg_size) {
    MOE_CUDA_TRY(moe_cuda_synth_launch(dst16, dst32, n, engine->cfg.model.weights.seed, layer, kind, expert, fan_in,
                                       0, engine->stream));
    return MOE_OK;
}

static moe_err_t load_layer_synthetic(moe_cuda_engine_t *engine, cuda_layer_t *L, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate, E = m->experts, Is = m->shared_intermediate;
    const int spr = engine->slots.slots_per_rank, first = engine->ep.rank * spr;
    MOE_TRY(synth(engine, L->router, nullptr, E * H, L->layer, MOE_SYNTH_ROUTER, -1, (int)H, msg, msg_size));
    if (L->bias != nullptr) MOE_TRY(synth(engine, nullptr, L->bias, E, L->layer, MOE_SYNTH_BIAS, -1, 1, msg, msg_size));
    for (int s = 0; s < spr; s++) {
        int e = L->slots->slot_expert[first + s];
        bf16 *w13 = L->w13 + (size_t)s * 2 * I * H;
        MOE_TRY(synth(engine, w13, nullptr, I * H, L->layer, MOE_SYNTH_W1, e, (int)H, msg, msg_size));
        MOE_TRY(synth(engine, w13 + I * H, nullptr, I * H, L->layer, MOE_SYNTH_W3, e, (int)H, msg, msg_size));
        MOE_TRY(synth(engine, L->w2 + (size_t)s * H * I, nullptr, H * I, L->layer, MOE_SYNTH_W2, e, (int)I, msg,
                      msg_size));
    }
    if (Is > 0) {
        MOE_TRY(synth(engine, L->shared_w13, nullptr, Is * H, L->layer, MOE_SYNTH_W1, MOE_SYNTH_SHARED_EXPERT, (int)H,
                      msg, msg_size));
        MOE_TRY(synth(engine, L->shared_w13 + Is * H, nullptr, Is * H, L->layer, MOE_SYNTH_W3,
                      MOE_SYNTH_SHARED_EXPERT, (int)H, msg, msg_size));
        MOE_TRY(synth(engine, L->shared_w2, nullptr, H * Is, L->layer, MOE_SYNTH_W2, MOE_SYNTH_SHARED_EXPERT,
                      (int)Is, msg, msg_size));
        if (L->shared_gate != nullptr)
            MOE_TRY(synth(engine, nullptr, L->shared_gate, H, L->layer, MOE_SYNTH_SHARED_GATE, -1, (int)H, msg,
                          msg_size));
    }
    return MOE_OK;
}

static moe_err_t load_layer_file(moe_cuda_engine_t *engine, moe_weights_t *weights, cuda_layer_t *L, char *msg,
                                 size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate, E = m->experts, Is = m->shared_intermediate;
    const int spr = engine->slots.slots_per_rank, first = engine->ep.rank * spr;
    size_t biggest = E * H > 3 * I * H ? E * H : 3 * I * H;
    if (3 * Is * H + H > biggest) biggest = 3 * Is * H + H;
    float *host = (float *)malloc(sizeof(float) * biggest);
    if (host == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "weights: out of host memory");
    moe_err_t ret = moe_weights_router(weights, L->layer, host, msg, msg_size);
    if (ret == MOE_OK) ret = upload_bf16(engine, L->router, host, E * H, msg, msg_size);
    if (ret == MOE_OK && L->bias != nullptr) {
        ret = moe_weights_bias(weights, L->layer, host, msg, msg_size);
        if (ret == MOE_OK) ret = upload_f32(engine, L->bias, host, E, msg, msg_size);
    }
    for (int s = 0; ret == MOE_OK && s < spr; s++) {
        /* w1 and w3 land next to each other: the fused [gate; up] layout */
        ret = moe_weights_expert(weights, L->layer, L->slots->slot_expert[first + s], host, host + I * H,
                                 host + 2 * I * H, msg, msg_size);
        if (ret == MOE_OK) ret = upload_bf16(engine, L->w13 + (size_t)s * 2 * I * H, host, 2 * I * H, msg, msg_size);
        if (ret == MOE_OK) ret = upload_bf16(engine, L->w2 + (size_t)s * H * I, host + 2 * I * H, H * I, msg, msg_size);
    }
    if (ret == MOE_OK && Is > 0) {
        ret = moe_weights_shared(weights, L->layer, host, host + Is * H, host + 2 * Is * H, host + 3 * Is * H, msg,
                                 msg_size);
        if (ret == MOE_OK) ret = upload_bf16(engine, L->shared_w13, host, 2 * Is * H, msg, msg_size);
        if (ret == MOE_OK) ret = upload_bf16(engine, L->shared_w2, host + 2 * Is * H, H * Is, msg, msg_size);
        if (ret == MOE_OK && L->shared_gate != nullptr)
            ret = upload_f32(engine, L->shared_gate, host + 3 * Is * H, H, msg, msg_size);
    }
    free(host);
    return ret;
}

static moe_err_t alloc_layer(moe_cuda_engine_t *engine, cuda_layer_t *L, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate, E = m->experts, Is = m->shared_intermediate;
    const size_t spr = (size_t)engine->slots.slots_per_rank;
    MOE_TRY(device_alloc((void **)&L->router, sizeof(bf16) * E * H, "the router", msg, msg_size));
    MOE_TRY(device_alloc((void **)&L->w13, sizeof(bf16) * spr * 2 * I * H, "expert gate/up weights", msg, msg_size));
    MOE_TRY(device_alloc((void **)&L->w2, sizeof(bf16) * spr * H * I, "expert down weights", msg, msg_size));
    if (m->routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK)
        MOE_TRY(device_alloc((void **)&L->bias, sizeof(float) * E, "the routing bias", msg, msg_size));
    if (Is > 0) {
        MOE_TRY(device_alloc((void **)&L->shared_w13, sizeof(bf16) * 2 * Is * H, "the shared expert", msg, msg_size));
        MOE_TRY(device_alloc((void **)&L->shared_w2, sizeof(bf16) * H * Is, "the shared expert", msg, msg_size));
        if (m->shared_expert_gate)
            MOE_TRY(device_alloc((void **)&L->shared_gate, sizeof(float) * H, "the shared gate", msg, msg_size));
    }
    return MOE_OK;
}

/* NCCL: rank 0 makes the unique ids, MPI broadcasts them. */
static moe_err_t init_nccl(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    if (engine->ep.size == 1) return MOE_OK;
    /* the ids travel with rank 0's outcome, so a failure there cannot
     * leave the other ranks in the broadcast */
    struct {
        ncclUniqueId ids[2];
        int ok;
    } boot;
    memset(&boot, 0, sizeof boot);
    ncclResult_t made = ncclSuccess;
    if (engine->ep.rank == 0) {
        made = ncclGetUniqueId(&boot.ids[0]);
        if (made == ncclSuccess) made = ncclGetUniqueId(&boot.ids[1]);
        boot.ok = made == ncclSuccess;
    }
    if (MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, engine->ep.comm) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "cuda: broadcasting the NCCL ids failed");
    if (!boot.ok)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "cuda: rank 0 could not make the NCCL ids%s%s",
                           made != ncclSuccess ? ": " : "", made != ncclSuccess ? ncclGetErrorString(made) : "");
    MOE_NCCL_TRY(ncclCommInitRank(&engine->comm, engine->ep.size, boot.ids[0], engine->ep.rank));
    ncclResult_t second = ncclCommInitRank(&engine->comm_balancer, engine->ep.size, boot.ids[1], engine->ep.rank);
    if (second != ncclSuccess) {
        ncclCommDestroy(engine->comm);
        MOE_NCCL_TRY(second);
    }
    engine->have_comm = true;
    return MOE_OK;
}

/* Every rank's vote (collective with more than one rank). */
static bool all_ranks_ok(const moe_cuda_engine_t *engine, bool ok) {
    int value = ok ? 1 : 0;
    if (engine->ep.size > 1 && MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_INT, MPI_MIN, engine->ep.comm) != MPI_SUCCESS)
        return false;
    return value == 1;
}

/* A tuning variable from the environment, or `fallback` when unset; false
 * with msg set when it is not an integer in [lo, hi]. */
static bool env_int(const char *name, int fallback, int lo, int hi, int *value, char *msg, size_t msg_size) {
    const char *text = getenv(name);
    *value = fallback;
    if (text == nullptr) return true;
    char *end = nullptr;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
        moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "%s='%s': expected an integer in [%d, %d]", name, text, lo, hi);
        return false;
    }
    *value = (int)v;
    return true;
}

/* This rank's own setup: device, streams, handles. No collective. */
static moe_err_t prepare(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED,
                           "moe.backend: cuda needs a GPU, and this machine has none usable (%s); use "
                           "moe.backend: cpu", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    }
    if (engine->local_ranks > count)
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED,
                           "moe.backend: cuda: %d ranks on this node but %d GPU(s); run one rank per GPU",
                           engine->local_ranks, count);
    engine->device = engine->local_rank % count;
    MOE_CUDA_TRY(cudaSetDevice(engine->device));
    cudaDeviceProp prop;
    MOE_CUDA_TRY(cudaGetDeviceProperties(&prop, engine->device));
    snprintf(engine->device_name, sizeof engine->device_name, "%.100s, %d SMs, %.1f GiB, cc %d.%d", prop.name,
             prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, prop.major, prop.minor);
    if (prop.major < 8)
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED,
                           "moe.backend: cuda needs bf16 tensor cores (compute capability >= 8.0); %s has %d.%d",
                           prop.name, prop.major, prop.minor);
    engine->cc_major = prop.major;
    engine->pdl = prop.major >= 9 && getenv("MOE_CUDA_NO_PDL") == nullptr && moe_cuda_decode_pdl_built() &&
                  moe_cuda_route_pdl_built() && moe_cuda_shared_pdl_built();
    if (prop.major >= 9 && !engine->pdl && getenv("MOE_CUDA_NO_PDL") == nullptr)
        moe_log(MOE_LOG_INFO, "cuda", "programmatic dependent launch off: the kernels were built for an "
                                      "architecture before sm_90 (CUDA_ARCH)");
    char why[160];
    int smem_optin = 0;
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, engine->device));
    engine->max_smem = (size_t)smem_optin;
    engine->l2_bytes = (size_t)prop.l2CacheSize;
    engine->own_grouped_ok =
        moe_cuda_grouped_supported(m->hidden, m->moe_intermediate, prop.major, engine->max_smem, why, sizeof why);
    if (engine->cfg.moe.gemm == MOE_GEMM_GROUPED && !engine->own_grouped_ok)
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED, "moe.gemm: 'grouped' %s; use cublas or auto", why);
    if (engine->own_grouped_ok) {
        char wg_why[160];
        engine->wgmma_ok = getenv("MOE_CUDA_NO_WGMMA") == nullptr &&
                           moe_cuda_wgmma_supported(engine->max_smem, wg_why, sizeof wg_why);
        if (!engine->wgmma_ok && getenv("MOE_CUDA_NO_WGMMA") == nullptr)
            moe_log(MOE_LOG_INFO, "cuda", "grouped GEMM: mma.sync tiles only (wgmma %s)", wg_why);
        int ws = 1;
        if (!env_int("MOE_CUDA_WGMMA_MIN_ROWS", 1, 1, 1 << 30, &engine->wgmma_min_rows, msg, msg_size) ||
            !env_int("MOE_CUDA_WGMMA_WS", 1, 0, 1, &ws, msg, msg_size) ||
            !env_int("MOE_CUDA_WGMMA_BN", 0, 0, 256, &engine->wgmma_bn, msg, msg_size) ||
            !env_int("MOE_CUDA_DECODE_ROWS", -1, 0, 1 << 30, &engine->decode_rows, msg, msg_size))
            return MOE_ERR_CONFIG;
        if (engine->wgmma_bn != 0 && engine->wgmma_bn != 64 && engine->wgmma_bn != 128 && engine->wgmma_bn != 256)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "MOE_CUDA_WGMMA_BN must be 64, 128 or 256 (have %d)",
                               engine->wgmma_bn);
        /* the warp-specialised wgmma form where it loads and the driver
         * encodes tensor maps (MOE_CUDA_WGMMA_WS=0: the classic form) */
        engine->wgmma_ws = engine->wgmma_ok && ws == 1 && moe_cuda_wgmma_ws_supported();
        if (engine->wgmma_ok && ws == 1 && !engine->wgmma_ws)
            moe_log(MOE_LOG_INFO, "cuda",
                    "grouped GEMM: wgmma in its classic form (the driver encodes no tensor maps)");
        static const char *const orders[] = {"auto", "tile", "weight"}; /* MOE_WGMMA_ORDER_* */
        const char *order = getenv("MOE_CUDA_WGMMA_ORDER");
        engine->wgmma_order = -1;
        for (int i = 0; i < 3; i++)
            if (order == nullptr || strcmp(order, orders[i]) == 0) engine->wgmma_order = order == nullptr ? 0 : i;
        if (engine->wgmma_order < 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "MOE_CUDA_WGMMA_ORDER must be auto, tile or weight (have '%s')", order);
    }
    /* the shared expert of a few tokens by moed's kernels (cuda_shared.cu; 0: cuBLAS at every size) */
    int shared_small = 1;
    if (!env_int("MOE_CUDA_SHARED_SMALL", 1, 0, 1, &shared_small, msg, msg_size)) return MOE_ERR_CONFIG;
    engine->shared_small = shared_small == 1;
    /* small steps as CUDA graphs up to this many tokens (cuda_graph.cu) */
    if (!env_int("MOE_CUDA_GRAPH_TOKENS", 16, 0, MOE_CUDA_ROUTER_MAX_TOKENS, &engine->graphs.max_tokens, msg, msg_size))
        return MOE_ERR_CONFIG;
    engine->exact = engine->cfg.moe.combine == MOE_COMBINE_EXACT && engine->ep.size > 1;
    if (engine->exact && engine->cfg.moe.gemm != MOE_GEMM_GROUPED)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "moe.combine: 'exact' needs moe.gemm: grouped (have '%s')",
                           moe_gemm_name(engine->cfg.moe.gemm));
    if (engine->exact && !engine->own_grouped_ok)
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED, "moe.combine: 'exact' needs the grouped kernels, which %s",
                           why);
    if (engine->exact) {
        /* one GEMM form at every size: an entry's output must not depend on
         * how many rows its rank received (the tiled forms compute each
         * element alone; the decode form sums in another order) */
        engine->decode_rows = 0;
        engine->wgmma_min_rows = 0;
        if (engine->wgmma_bn == 0) engine->wgmma_bn = 128;
    }
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&engine->stream, cudaStreamNonBlocking));
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&engine->aux, cudaStreamNonBlocking));
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&engine->balancer, cudaStreamNonBlocking));
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&engine->migration_stream, cudaStreamNonBlocking));
    MOE_CUDA_TRY(cudaEventCreateWithFlags(&engine->ev_begin, cudaEventDisableTiming));
    MOE_CUDA_TRY(cudaEventCreateWithFlags(&engine->ev_input, cudaEventDisableTiming));
    for (int set = 0; set < 2; set++)
        for (int e = 0; e < EV_COUNT; e++) MOE_CUDA_TRY(cudaEventCreateWithFlags(&engine->ev[set][e], cudaEventDisableTiming));
    engine->rank_counts = (int *)calloc((size_t)16 * engine->ep.size, sizeof(int));
    if (engine->rank_counts == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: out of memory");
    engine->grouped_gemm = getenv("MOE_CUDA_NO_GROUPED") == nullptr;
    engine->grouped_min_slots = getenv("MOE_CUDA_FORCE_GROUPED") != nullptr ? 0 : 16;
    engine->profile.on = getenv("MOE_CUDA_PROFILE") != nullptr;
    engine->poison_out = getenv("MOE_CUDA_POISON_OUTPUT") != nullptr;
    for (int p = 0; engine->profile.on && p <= MOE_CUDA_PHASES; p++)
        MOE_CUDA_TRY(cudaEventCreate(&engine->profile.marks[p]));
    MOE_CUBLAS_TRY(cublasCreate(&engine->cublas));
    MOE_CUBLAS_TRY(cublasSetStream(engine->cublas, engine->stream));
    MOE_CUBLAS_TRY(cublasCreate(&engine->cublas_aux));
    MOE_CUBLAS_TRY(cublasSetStream(engine->cublas_aux, engine->aux));
    return MOE_OK;
}

static moe_err_t create(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    moe_err_t prepared = prepare(engine, msg, msg_size);
    /* the NCCL bootstrap is collective: only when every rank got this far
     * (a rank without a GPU must not leave the others in MPI_Bcast) */
    if (!all_ranks_ok(engine, prepared == MOE_OK))
        return prepared != MOE_OK ? prepared
                                  : moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda: another rank failed to start");
    /* profiling runs the chunks one after another, which orders the NCCL
     * calls differently from overlap: only when every rank profiles */
    if (!all_ranks_ok(engine, engine->profile.on)) engine->profile.on = false;
    MOE_TRY(init_nccl(engine, msg, msg_size));
    MOE_TRY(device_alloc((void **)&engine->d_step_counts, sizeof(unsigned long long) * engine->slots.n_slots,
                         "the slot counters", msg, msg_size));
    MOE_CUDA_TRY(cudaMemset(engine->d_step_counts, 0, sizeof(unsigned long long) * engine->slots.n_slots));
    if (m->routing.method == MOE_ROUTE_ZIPF) {
        double cdf[MOE_MAX_EXPERTS];
        moe_route_zipf_cdf(m->experts, m->routing.zipf_s, cdf);
        MOE_TRY(device_alloc((void **)&engine->d_zipf_cdf, sizeof(double) * m->experts, "the zipf table", msg, msg_size));
        MOE_CUDA_TRY(cudaMemcpy(engine->d_zipf_cdf, cdf, sizeof(double) * m->experts, cudaMemcpyHostToDevice));
    }
    engine->n_layers = m->n_layers;
    engine->layers = (cuda_layer_t *)calloc((size_t)m->n_layers, sizeof(cuda_layer_t));
    if (engine->layers == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: out of memory");
    /* per-layer placements: eplb.placement_file, else the configured one */
    int *placements = nullptr;
    if (engine->cfg.eplb.placement_file[0] != '\0') {
        placements = (int *)malloc(sizeof(int) * (size_t)m->n_layers * engine->slots.n_slots);
        if (placements == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: out of memory");
        moe_err_t loaded = moe_eplb_load_placement_file(engine->cfg.eplb.placement_file, m->experts,
                                                        engine->slots.n_slots, m->n_layers, m->layer_ids, placements,
                                                        msg, msg_size);
        if (loaded != MOE_OK) {
            free(placements);
            return loaded;
        }
    }
    moe_err_t ret = MOE_OK;
    for (int l = 0; ret == MOE_OK && l < m->n_layers; l++)
        engine->layers[l].layer = m->layer_ids[l],
        ret = moe_cuda_layer_slots(engine, &engine->layers[l],
                                   placements != nullptr ? placements + (size_t)l * engine->slots.n_slots : nullptr,
                                   msg, msg_size);
    free(placements);
    if (ret != MOE_OK) return ret;
    moe_weights_t *weights = nullptr;
    if (m->weights.format == MOE_WEIGHTS_SAFETENSORS) MOE_TRY(moe_weights_open(m, &weights, msg, msg_size));
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double last_report = 0;
    for (int l = 0; ret == MOE_OK && l < m->n_layers; l++) {
        cuda_layer_t *L = &engine->layers[l];
        L->layer = m->layer_ids[l];
        ret = alloc_layer(engine, L, msg, msg_size);
        if (ret == MOE_OK)
            ret = weights != nullptr ? load_layer_file(engine, weights, L, msg, msg_size)
                                     : load_layer_synthetic(engine, L, msg, msg_size);
        clock_gettime(CLOCK_MONOTONIC, &now);
        double elapsed = (double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) * 1e-9;
        if (elapsed - last_report > 2.0) {
            moe_log(MOE_LOG_INFO, "weights", "rank %d: loaded %d/%d layers onto %s (%.1f s)", engine->ep.rank, l + 1,
                    m->n_layers, engine->device_name, elapsed);
            last_report = elapsed;
        }
    }
    moe_weights_close(weights);
    if (ret == MOE_OK) {
        cudaError_t sync = cudaStreamSynchronize(engine->stream);
        if (sync != cudaSuccess) {
            (void)cudaGetLastError();
            return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda: loading weights: %s", cudaGetErrorString(sync));
        }
        ret = moe_cuda_autotune(engine, msg, msg_size);
    }
    return ret;
}

extern "C" moe_err_t moe_cuda_create(const moe_config_t *cfg, moe_ep_t ep, moe_cuda_engine_t **out, char *msg,
                                     size_t msg_size) {
    *out = nullptr;
    moe_cuda_engine_t *engine = (moe_cuda_engine_t *)calloc(1, sizeof *engine);
    if (engine == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda engine: out of memory");
    engine->cfg = *cfg;
    engine->ep = ep;
    cuda_buffer_t *buffers = (cuda_buffer_t *)&engine->ws;
    for (size_t i = 0; i < sizeof engine->ws / sizeof(cuda_buffer_t); i++) buffers[i].host = false;
    engine->ws.host_counts.host = engine->ws.host_x.host = engine->ws.host_out.host = true;
    engine->ws.host_stats.host = engine->ws.host_gemm_ptrs.host = true;
    for (int set = 0; set < 2; set++) engine->ws.chunk[set].host_ids.host = engine->ws.chunk[set].host_weights.host = true;
    moe_route_params_t params;
    moe_route_params_init(&params, &cfg->model, nullptr, 0, ep.rank, ep.size);
    moe_err_t ret = moe_route_validate(&params, msg, msg_size);
    if (ret == MOE_OK) ret = moe_slots_build(&cfg->eplb, cfg->model.experts, ep.size, &engine->slots, msg, msg_size);
    /* the rank's GPU: its index among the ranks of its node (MPI's view,
     * whatever the launcher; one rank: GPU 0) */
    engine->local_rank = 0, engine->local_ranks = 1;
    if (ep.size > 1) {
        MPI_Comm node = MPI_COMM_NULL;
        if (MPI_Comm_split_type(ep.comm, MPI_COMM_TYPE_SHARED, ep.rank, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
            MPI_Comm_rank(node, &engine->local_rank);
            MPI_Comm_size(node, &engine->local_ranks);
            MPI_Comm_free(&node);
        } else if (ret == MOE_OK) {
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "cuda: cannot find the ranks of this node");
        }
    }
    if (ret == MOE_OK) ret = create(engine, msg, msg_size);
    /* moe.comm auto times collectives: only when every rank is up */
    bool up = all_ranks_ok(engine, ret == MOE_OK);
    if (ret == MOE_OK && !up)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda engine: another rank failed to start");
    if (ret == MOE_OK) ret = moe_cuda_tune_comm(engine, msg, msg_size);
    if (ret == MOE_OK) ret = moe_cuda_graph_init(engine, engine->graphs.max_tokens, msg, msg_size);
    if (ret != MOE_OK) {
        moe_cuda_destroy(engine);
        return ret;
    }
    moe_log(MOE_LOG_INFO, "cuda", "rank %d on GPU %d: %s; %d layers, %d slots", ep.rank, engine->device,
            engine->device_name, engine->n_layers, engine->slots.slots_per_rank);
    *out = engine;
    return MOE_OK;
}

extern "C" moe_err_t moe_cuda_host_alloc(moe_cuda_engine_t *engine, size_t bytes, void **ptr, char *msg,
                                         size_t msg_size) {
    *ptr = nullptr;
    cudaError_t e = cudaSetDevice(engine->device);
    if (e == cudaSuccess) e = cudaHostAlloc(ptr, bytes > 0 ? bytes : 16, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *ptr = nullptr;
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: cannot pin %zu bytes of host memory: %s", bytes,
                           cudaGetErrorString(e));
    }
    return MOE_OK;
}

extern "C" void moe_cuda_host_free(moe_cuda_engine_t *engine, void *ptr) {
    (void)engine;
    if (ptr != nullptr) cudaFreeHost(ptr);
}

extern "C" void moe_cuda_destroy(moe_cuda_engine_t *engine) {
    if (engine == nullptr) return;
    if (engine->migration.active) { /* wait for the loader before freeing what it reads */
        char msg[64];
        (void)moe_cuda_migrate_end(engine, false, nullptr, msg, sizeof msg);
    }
    if (engine->stream != nullptr) cudaStreamSynchronize(engine->stream);
    moe_cuda_graph_destroy(engine);
    for (int l = 0; engine->layers != nullptr && l < engine->n_layers; l++) {
        cuda_layer_t *L = &engine->layers[l];
        cudaFree(L->router), cudaFree(L->bias), cudaFree(L->w13), cudaFree(L->w2);
        cudaFree(L->shared_w13), cudaFree(L->shared_w2), cudaFree(L->shared_gate);
        cudaFree(L->d_slots), free(L->slots);
    }
    free(engine->layers);
    cuda_buffer_t *buffers = (cuda_buffer_t *)&engine->ws;
    for (size_t i = 0; i < sizeof engine->ws / sizeof(cuda_buffer_t); i++) {
        if (buffers[i].ptr == nullptr) continue;
        if (buffers[i].host) cudaFreeHost(buffers[i].ptr);
        else cudaFree(buffers[i].ptr);
    }
    cudaFree(engine->d_step_counts);
    cudaFree(engine->d_zipf_cdf);
    if (engine->have_comm) {
        ncclCommDestroy(engine->comm);
        ncclCommDestroy(engine->comm_balancer);
    }
    for (int p = 0; p <= MOE_CUDA_PHASES; p++)
        if (engine->profile.marks[p] != nullptr) cudaEventDestroy(engine->profile.marks[p]);
    if (engine->cublas != nullptr) cublasDestroy(engine->cublas);
    if (engine->cublas_aux != nullptr) cublasDestroy(engine->cublas_aux);
    if (engine->aux != nullptr) cudaStreamSynchronize(engine->aux);
    if (engine->balancer != nullptr) cudaStreamSynchronize(engine->balancer);
    if (engine->ev_begin != nullptr) cudaEventDestroy(engine->ev_begin);
    if (engine->ev_input != nullptr) cudaEventDestroy(engine->ev_input);
    for (int set = 0; set < 2; set++)
        for (int e = 0; e < EV_COUNT; e++)
            if (engine->ev[set][e] != nullptr) cudaEventDestroy(engine->ev[set][e]);
    free(engine->rank_counts);
    if (engine->stream != nullptr) cudaStreamDestroy(engine->stream);
    if (engine->aux != nullptr) cudaStreamDestroy(engine->aux);
    if (engine->balancer != nullptr) cudaStreamDestroy(engine->balancer);
    if (engine->migration_stream != nullptr) cudaStreamDestroy(engine->migration_stream);
    (void)cudaGetLastError();
    free(engine);
}

extern "C" void moe_cuda_reconfigure(moe_cuda_engine_t *engine, const moe_config_t *cfg) {
    moe_cuda_graph_invalidate(engine); /* they baked in the chunking and the GEMM table */
    engine->cfg.moe.chunking = cfg->moe.chunking;
    engine->cfg.moe.max_tokens_per_step = cfg->moe.max_tokens_per_step;
    if (cfg->moe.gemm == engine->cfg.moe.gemm) return;
    /* a new moe.gemm: grouped was checked against the model when the
     * reload was validated (config cross-field rules); auto tunes now, at
     * this step boundary, unless the cache has the table */
    const moe_gemm_kind_t old = engine->cfg.moe.gemm;
    engine->cfg.moe.gemm = cfg->moe.gemm;
    if (cfg->moe.gemm == MOE_GEMM_GROUPED && !engine->own_grouped_ok) engine->cfg.moe.gemm = old;
    char msg[512];
    if (moe_cuda_autotune(engine, msg, sizeof msg) != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "cuda", "moe.gemm %s: %s; keeping %s", moe_gemm_name(cfg->moe.gemm), msg,
                moe_gemm_name(old));
        engine->cfg.moe.gemm = old;
        if (moe_cuda_autotune(engine, msg, sizeof msg) != MOE_OK)
            for (int b = 0; b < MOE_GEMM_BUCKETS; b++) engine->gemm_table[b] = MOE_IMPL_CUBLAS;
    }
    moe_log(MOE_LOG_INFO, "cuda", "rank %d: expert GEMM now %s", engine->ep.rank, engine->gemm_text);
}

extern "C" const char *moe_cuda_gemm_table(const moe_cuda_engine_t *engine) { return engine->gemm_text; }

extern "C" void moe_cuda_grouped_forms(const moe_cuda_engine_t *engine, long long *wgmma, long long *ws,
                                       long long *mma, long long *decode, bool *wgmma_ok) {
    *wgmma = engine->grouped_runs[1];
    *ws = engine->grouped_runs[3];
    *mma = engine->grouped_runs[0];
    *decode = engine->grouped_runs[2];
    *wgmma_ok = engine->wgmma_ok;
}

extern "C" void moe_cuda_shared_forms(const moe_cuda_engine_t *engine, long long *cublas, long long *small) {
    *cublas = engine->shared_runs[0];
    *small = engine->shared_runs[1];
}

extern "C" int moe_cuda_slot_count(const moe_cuda_engine_t *engine) { return engine->slots.n_slots; }
extern "C" const int *moe_cuda_placement(const moe_cuda_engine_t *engine, int layer) {
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer) return engine->layers[i].slots->slot_expert;
    return nullptr;
}
extern "C" const char *moe_cuda_device_name(const moe_cuda_engine_t *engine) { return engine->device_name; }

extern "C" moe_err_t moe_cuda_check(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    if (!engine->have_comm) return MOE_OK;
    ncclComm_t comms[2] = {engine->comm, engine->comm_balancer};
    for (int i = 0; i < 2; i++) {
        ncclResult_t async = ncclSuccess;
        ncclResult_t rc = ncclCommGetAsyncError(comms[i], &async);
        if (rc == ncclSuccess && async == ncclSuccess) continue;
        ncclResult_t error = rc != ncclSuccess ? rc : async;
        moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "NCCL %s communicator: %s (%s)", i == 0 ? "main" : "balancer",
                    ncclGetErrorString(error), ncclGetLastError(comms[i]));
        ncclCommAbort(engine->comm);
        ncclCommAbort(engine->comm_balancer);
        engine->have_comm = false;
        return MOE_ERR_MPI;
    }
    return MOE_OK;
}
