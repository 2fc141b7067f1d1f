/* backend: the table of backends built into this binary. The CUDA row
 * exists only in a CUDA build (MOE_WITH_CUDA, set by the Makefile). */
#include <omp.h>
#include <stdio.h>

#include "moe_backend.h"
#ifdef MOE_WITH_CUDA
#include "cuda/moe_cuda.h"
#endif

static moe_err_t cpu_create(const moe_config_t *cfg, moe_ep_t ep, void **state, char *msg,
                            size_t msg_size) {
    moe_cpu_engine_t *engine = NULL;
    moe_err_t err = moe_cpu_create(cfg, ep, &engine, msg, msg_size);
    *state = engine;
    return err;
}

static moe_err_t cpu_forward(void *state, int layer, const float *x, int n_tokens,
                             const int32_t *routed_ids, const float *routed_weights, float *out,
                             moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return moe_cpu_forward(state, layer, x, n_tokens, routed_ids, routed_weights, out, trace, msg,
                           msg_size);
}

static moe_err_t cpu_forward_bf16(void *state, int layer, const uint16_t *x, int n_tokens,
                                  const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                                  moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return moe_cpu_forward_bf16(state, layer, x, n_tokens, routed_ids, routed_weights, out, trace, msg,
                                msg_size);
}

static void cpu_reconfigure(void *state, const moe_config_t *cfg) { moe_cpu_reconfigure(state, cfg); }
static int cpu_slot_count(const void *state) { return moe_cpu_slot_count(state); }
static const int *cpu_placement(const void *state, int layer) { return moe_cpu_placement(state, layer); }
static moe_err_t cpu_migrate_begin(void *state, int layer, const int *slot_expert, char *msg, size_t msg_size) {
    return moe_cpu_migrate_begin(state, layer, slot_expert, msg, msg_size);
}
static int cpu_migrate_poll(void *state) { return moe_cpu_migrate_poll(state); }
static moe_err_t cpu_migrate_end(void *state, bool commit, int64_t *bytes_loaded, char *msg, size_t msg_size) {
    return moe_cpu_migrate_end(state, commit, bytes_loaded, msg, msg_size);
}
static void cpu_destroy(void *state) { moe_cpu_destroy(state); }
static const char *cpu_device(const void *state) {
    static char text[64];
    (void)state;
    snprintf(text, sizeof text, "cpu, %d threads", omp_get_max_threads());
    return text;
}

#ifdef MOE_WITH_CUDA
static moe_err_t cuda_create(const moe_config_t *cfg, moe_ep_t ep, void **state, char *msg,
                             size_t msg_size) {
    moe_cuda_engine_t *engine = NULL;
    moe_err_t err = moe_cuda_create(cfg, ep, &engine, msg, msg_size);
    *state = engine;
    return err;
}

static moe_err_t cuda_forward(void *state, int layer, const float *x, int n_tokens,
                              const int32_t *routed_ids, const float *routed_weights, float *out,
                              moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return moe_cuda_forward(state, layer, x, n_tokens, routed_ids, routed_weights, out, trace, msg,
                            msg_size);
}

static moe_err_t cuda_forward_bf16(void *state, int layer, const uint16_t *x, int n_tokens,
                                   const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                                   moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return moe_cuda_forward_bf16(state, layer, x, n_tokens, routed_ids, routed_weights, out, trace, msg,
                                 msg_size);
}

static moe_err_t cuda_bench(void *state, int layer, int n_tokens, int warmup, int iters,
                            double *ms_per_iter, double *comm_bytes, char *msg, size_t msg_size) {
    return moe_cuda_bench(state, layer, n_tokens, warmup, iters, ms_per_iter, comm_bytes, msg, msg_size);
}

static void cuda_reconfigure(void *state, const moe_config_t *cfg) { moe_cuda_reconfigure(state, cfg); }
static int cuda_slot_count(const void *state) { return moe_cuda_slot_count(state); }
static const int *cuda_placement(const void *state, int layer) { return moe_cuda_placement(state, layer); }
static moe_err_t cuda_migrate_begin(void *state, int layer, const int *slot_expert, char *msg, size_t msg_size) {
    return moe_cuda_migrate_begin(state, layer, slot_expert, msg, msg_size);
}
static int cuda_migrate_poll(void *state) { return moe_cuda_migrate_poll(state); }
static moe_err_t cuda_migrate_end(void *state, bool commit, int64_t *bytes_loaded, char *msg, size_t msg_size) {
    return moe_cuda_migrate_end(state, commit, bytes_loaded, msg, msg_size);
}
static const char *cuda_device(const void *state) { return moe_cuda_device_name(state); }
static const char *cuda_gemm(const void *state) { return moe_cuda_gemm_table(state); }
static moe_err_t cuda_check(void *state, char *msg, size_t msg_size) { return moe_cuda_check(state, msg, msg_size); }
static moe_err_t cuda_host_alloc(void *state, size_t bytes, void **ptr, char *msg, size_t msg_size) {
    return moe_cuda_host_alloc(state, bytes, ptr, msg, msg_size);
}
static void cuda_host_free(void *state, void *ptr) { moe_cuda_host_free(state, ptr); }
static void cuda_destroy(void *state) { moe_cuda_destroy(state); }
#endif

static const moe_backend_ops_t backends[] = {
    {.name = "cpu",
     .kind = MOE_BACKEND_CPU,
     .create = cpu_create,
     .forward = cpu_forward,
     .reconfigure = cpu_reconfigure,
     .slot_count = cpu_slot_count,
     .placement = cpu_placement,
     .migrate_begin = cpu_migrate_begin,
     .migrate_poll = cpu_migrate_poll,
     .migrate_end = cpu_migrate_end,
     .device = cpu_device,
     .counts_summed = false,
     .forward_bf16 = cpu_forward_bf16,
     .destroy = cpu_destroy},
#ifdef MOE_WITH_CUDA
    {.name = "cuda",
     .kind = MOE_BACKEND_CUDA,
     .create = cuda_create,
     .forward = cuda_forward,
     .reconfigure = cuda_reconfigure,
     .slot_count = cuda_slot_count,
     .placement = cuda_placement,
     .migrate_begin = cuda_migrate_begin,
     .migrate_poll = cuda_migrate_poll,
     .migrate_end = cuda_migrate_end,
     .bench = cuda_bench,
     .check = cuda_check,
     .device = cuda_device,
     .counts_summed = true,
     .gemm = cuda_gemm,
     .host_alloc = cuda_host_alloc,
     .host_free = cuda_host_free,
     .forward_bf16 = cuda_forward_bf16,
     .destroy = cuda_destroy},
#endif
};

const char *moe_backend_available(void) {
#ifdef MOE_WITH_CUDA
    return "cpu, cuda";
#else
    return "cpu";
#endif
}

moe_err_t moe_backend_create(const moe_config_t *cfg, moe_ep_t ep, moe_backend_t *out, char *msg,
                             size_t msg_size) {
    out->ops = NULL;
    out->state = NULL;
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++) {
        if (backends[i].kind != cfg->moe.backend) continue;
        if (cfg->eplb.mode == MOE_EPLB_ONLINE && backends[i].migrate_begin == NULL)
            return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED,
                               "eplb.mode: 'online' needs weight migration, which the %s backend does not have "
                               "in this version; use off or static", backends[i].name);
        out->ops = &backends[i];
        return backends[i].create(cfg, ep, &out->state, msg, msg_size);
    }
    return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED,
                       "moe.backend: '%s' is not available in this build (built without it: "
                       "build with nvcc on the PATH, or CUDA=1); available: %s",
                       moe_backend_name(cfg->moe.backend), moe_backend_available());
}

void moe_backend_destroy(moe_backend_t *backend) {
    if (backend->ops != NULL && backend->state != NULL) backend->ops->destroy(backend->state);
    backend->ops = NULL;
    backend->state = NULL;
}
