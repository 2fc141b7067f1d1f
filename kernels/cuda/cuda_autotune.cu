/* cuda_autotune: the expert-GEMM table (DESIGN §5, `moe.gemm`).
 *
 * `cublas` and `grouped` put one implementation in every token-count
 * bucket. `auto` times every capable implementation for each bucket (powers
 * of two up to moe.autotune.max_tokens received rows) on dummy inputs
 * routed only to this rank's own slots — balanced and random, as a real
 * expert-parallel step is, and by the model's own router — and keeps the
 * faster one (sum over the
 * distributions, median of MOE_TUNE_ITERS runs each). Random is drawn two
 * ways: uniform, and skewed as an unbalanced router is (a quarter of the
 * slots take three times the entries of the others: max/mean 2). Uniform
 * alone (a few percent around the mean) hid what uneven counts cost the
 * grouped kernel's 128-row tiles: Mixtral at 1024 tokens was tuned to
 * grouped (1.295 against cuBLAS's 1.354 ms on those inputs) and then ran
 * 1.69-1.71 ms on the synthetic model's routing, cuBLAS 1.40-1.46; with
 * the skewed shape the two still tied there (1.291 against 1.301 ms) and
 * the choice flipped between runs, so the model's own routing of random
 * tokens is a fourth distribution (model_step). The table is cached
 * in moe.autotune.cache under a key of (device, shapes, dtype, EP size,
 * slot count, implementation set, kernel revision), so a restart on the
 * same machine and model does not tune again. Timing runs on this rank
 * alone: no collective, so ranks may choose differently. */
#include <errno.h>

#include "cuda_internal.h"

#define MOE_TUNE_ITERS 5
/* Bump when a kernel changes enough that cached choices are stale. */
#define MOE_TUNE_REVISION "grouped-ws-v5"

static const char *const impl_names[MOE_IMPL_COUNT] = {"cublas", "grouped"};

static int max_bucket(const moe_cuda_engine_t *engine) {
    int b = moe_cuda_bucket(engine->cfg.moe.autotune.max_tokens);
    return b < MOE_GEMM_BUCKETS ? b : MOE_GEMM_BUCKETS - 1;
}

/* "auto (tuned): 1-64 rows grouped, 128-16384 cublas" */
static void describe(moe_cuda_engine_t *engine, const char *how) {
    char *text = engine->gemm_text;
    size_t size = sizeof engine->gemm_text;
    int n = snprintf(text, size, "%s:", how);
    const int last = max_bucket(engine);
    for (int b = 0; b <= last && n < (int)size;) {
        int e = b;
        while (e < last && engine->gemm_table[e + 1] == engine->gemm_table[b]) e++;
        n += snprintf(text + n, size - (size_t)n, "%s %d-%d rows %s", b == 0 ? "" : ",", b == 0 ? 1 : (1 << (b - 1)) + 1,
                      1 << e, impl_names[engine->gemm_table[b]]);
        b = e + 1;
    }
    if (n < (int)size && last < MOE_GEMM_BUCKETS - 1)
        snprintf(text + n, size - (size_t)n, " (larger: as %d)", 1 << last);
}

static void key_of(const moe_cuda_engine_t *engine, char *key, size_t size) {
    const moe_model_config_t *m = &engine->cfg.model;
    int cublas_version = 0;
    cublasGetVersion(engine->cublas, &cublas_version);
    char wgmma[128] = "";
    if (engine->own_grouped_ok)
        snprintf(wgmma, sizeof wgmma, "+decode(rows=%d)%s", engine->decode_rows, engine->wgmma_ok ? "" : "+mma");
    if (engine->wgmma_ok)
        snprintf(wgmma + strlen(wgmma), sizeof wgmma - strlen(wgmma), "+wgmma(min_rows=%d bn=%d%s order=%d)",
                 engine->wgmma_min_rows, engine->wgmma_bn, engine->wgmma_ws ? " ws" : "", engine->wgmma_order);
    snprintf(key, size,
             "%s | H=%d I=%d E=%d k=%d | bf16 | ep=%d slots/rank=%d | impls=cublas%s%s%s%s | cublas %d | max_rows=%d | %s",
             engine->device_name, m->hidden, m->moe_intermediate, m->experts, m->top_k, engine->ep.size,
             engine->slots.slots_per_rank, engine->own_grouped_ok ? ",grouped" : "", wgmma,
             getenv("MOE_CUDA_NO_GROUPED") != nullptr ? " no-cublas-grouped" : "",
             getenv("MOE_CUDA_FORCE_GROUPED") != nullptr ? " force-cublas-grouped" : "", cublas_version,
             engine->cfg.moe.autotune.max_tokens, MOE_TUNE_REVISION);
}

/* Reads the cache: true when its key matches and every bucket is there. */
static bool load_cache(moe_cuda_engine_t *engine, const char *path, const char *key) {
    FILE *f = fopen(path, "r");
    if (f == nullptr) {
        if (errno != ENOENT)
            moe_log(MOE_LOG_WARN, "autotune", "%s: %s; tuning instead", path, strerror(errno));
        return false;
    }
    char line[1024];
    bool ok = fgets(line, sizeof line, f) != nullptr && strcmp(line, "moed-autotune 1\n") == 0 &&
              fgets(line, sizeof line, f) != nullptr && strncmp(line, "key: ", 5) == 0;
    if (ok) {
        line[strcspn(line, "\n")] = '\0';
        ok = strcmp(line + 5, key) == 0;
        if (!ok) moe_log(MOE_LOG_INFO, "autotune", "%s was made for another setup; tuning again", path);
    }
    moe_gemm_impl_t table[MOE_GEMM_BUCKETS];
    double ms[MOE_GEMM_BUCKETS][MOE_IMPL_COUNT] = {};
    const int last = max_bucket(engine);
    for (int b = 0; ok && b <= last; b++) {
        int rows = 0;
        char name[32];
        ok = fgets(line, sizeof line, f) != nullptr &&
             sscanf(line, "%d %31s %lf %lf", &rows, name, &ms[b][0], &ms[b][1]) == 4 && rows == (1 << b);
        if (ok) {
            ok = false;
            for (int i = 0; i < MOE_IMPL_COUNT; i++)
                if (strcmp(name, impl_names[i]) == 0) table[b] = (moe_gemm_impl_t)i, ok = true;
            ok = ok && (table[b] != MOE_IMPL_GROUPED || engine->own_grouped_ok);
        }
        if (!ok) moe_log(MOE_LOG_WARN, "autotune", "%s: bucket %d unreadable; tuning again", path, 1 << b);
    }
    fclose(f);
    if (!ok) return false;
    for (int b = 0; b < MOE_GEMM_BUCKETS; b++) engine->gemm_table[b] = table[b <= last ? b : last];
    memcpy(engine->tune_ms, ms, sizeof ms);
    return true;
}

static void save_cache(const moe_cuda_engine_t *engine, const char *path, const char *key) {
    char tmp[MOE_PATH_MAX + 16];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, engine->ep.rank);
    FILE *f = fopen(tmp, "w");
    if (f == nullptr) {
        moe_log(MOE_LOG_WARN, "autotune", "cannot write the cache %s: %s", tmp, strerror(errno));
        return;
    }
    fprintf(f, "moed-autotune 1\nkey: %s\n", key);
    for (int b = 0; b <= max_bucket(engine); b++)
        fprintf(f, "%d %s %.6f %.6f\n", 1 << b, impl_names[engine->gemm_table[b]], engine->tune_ms[b][0],
                engine->tune_ms[b][1]);
    bool ok = fflush(f) == 0 && ferror(f) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        moe_log(MOE_LOG_WARN, "autotune", "cannot write the cache %s: %s", path, strerror(errno));
        remove(tmp);
    }
}

enum { DIST_BALANCED, DIST_UNIFORM, DIST_SKEWED, DIST_MODEL, DIST_COUNT };

/* Dummy received rows: random values, each row with max(1, k/R) entries
 * on this rank's slots: round robin (balanced), pseudo-random (uniform), or
 * pseudo-random with the first max(1, S/4) slots three times as likely as
 * the others (skewed). */
static moe_err_t dummy_step(moe_cuda_engine_t *engine, int rows, int dist, bf16 **rows_out,
                            cuda_meta_t **meta_out, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k, S = engine->slots.slots_per_rank;
    const int local = k / engine->ep.size > 1 ? k / engine->ep.size : 1;
    bf16 *x = (bf16 *)moe_cuda_reserve(&engine->ws.chunk[0].recv_rows, sizeof(bf16) * (size_t)rows * H, msg, msg_size);
    cuda_meta_t *meta = (cuda_meta_t *)moe_cuda_reserve(&engine->ws.chunk[0].recv_meta,
                                                         sizeof(cuda_meta_t) * (size_t)rows * k, msg, msg_size);
    if (x == nullptr || meta == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(moe_cuda_synth_launch(x, nullptr, (size_t)rows * H, 0x7a11e5ull, 0, 99, 0, 1, 0, engine->stream));
    cuda_meta_t *host = (cuda_meta_t *)malloc(sizeof(cuda_meta_t) * (size_t)rows * k);
    if (host == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "autotune: out of memory");
    uint64_t state = 0x9e3779b97f4a7c15ull ^ (uint64_t)rows;
    const int hot = S / 4 > 0 ? S / 4 : 1, span = 3 * hot + (S - hot);
    for (size_t r = 0; r < (size_t)rows; r++)
        for (int i = 0; i < k; i++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            int slot = (int)((r * k + i) % (size_t)S);
            if (dist == DIST_UNIFORM) slot = (int)((state >> 33) % (uint64_t)S);
            if (dist == DIST_SKEWED) {
                const int v = (int)((state >> 33) % (uint64_t)span);
                slot = v < 3 * hot ? v / 3 : hot + (v - 3 * hot);
            }
            host[r * k + i] = i < local ? cuda_meta_t{slot, 1.0f / (float)k} : cuda_meta_t{-1, 0.0f};
        }
    cudaError_t e = cudaMemcpyAsync(meta, host, sizeof(cuda_meta_t) * (size_t)rows * k, cudaMemcpyHostToDevice,
                                    engine->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(engine->stream);
    free(host);
    MOE_CUDA_TRY(e);
    *rows_out = x;
    *meta_out = meta;
    return MOE_OK;
}

/* Rows routed by the model itself (layer 0's router and routing, as a step
 * does, on random tokens), this rank's entries kept (the others -1): the
 * counts a real step sees, which the shapes above only approximate — on
 * Mixtral at 1024 rows they tied the two implementations while on the
 * model's routing cuBLAS was 12-14% faster. Not for client routing (no
 * router). */
static moe_err_t model_step(moe_cuda_engine_t *engine, int rows, bf16 **rows_out, cuda_meta_t **meta_out, char *msg,
                            size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int H = m->hidden, k = m->top_k, E = m->experts, S = engine->slots.slots_per_rank;
    cuda_layer_t *L = &engine->layers[0];
    cuda_chunk_ws_t *ws = &engine->ws.chunk[0];
    bf16 *x = (bf16 *)moe_cuda_reserve(&ws->recv_rows, sizeof(bf16) * (size_t)rows * H, msg, msg_size);
    cuda_meta_t *meta = (cuda_meta_t *)moe_cuda_reserve(&ws->recv_meta, sizeof(cuda_meta_t) * (size_t)rows * k, msg,
                                                        msg_size);
    int32_t *ids = (int32_t *)moe_cuda_reserve(&ws->ids, sizeof(int32_t) * (size_t)rows * k, msg, msg_size);
    float *weights = (float *)moe_cuda_reserve(&ws->weights, sizeof(float) * (size_t)rows * k, msg, msg_size);
    int32_t *entry_slot = (int32_t *)moe_cuda_reserve(&ws->entry_slot, sizeof(int32_t) * (size_t)rows * k, msg,
                                                      msg_size);
    float *logits = (float *)moe_cuda_reserve(&ws->logits, sizeof(float) * (size_t)rows * E, msg, msg_size);
    if (!x || !meta || !ids || !weights || !entry_slot || !logits) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(moe_cuda_synth_launch(x, nullptr, (size_t)rows * H, 0x7a11e5ull + (uint64_t)engine->ep.rank, 0, 99, 0,
                                       1, 0, engine->stream));
    if (moe_route_needs_logits(m->routing.method))
        MOE_TRY(moe_cuda_gemm(engine->cublas, E, rows, H, L->router, x, logits, CUDA_R_32F, msg, msg_size));
    moe_route_params_t params;
    moe_route_params_init(&params, m, nullptr, L->layer, engine->ep.rank, engine->ep.size);
    moe_route_token_params_t tp = moe_route_token_params(&params);
    /* slots as on one rank (global ones), made this rank's below */
    MOE_CUDA_TRY(moe_cuda_route_launch(&tp, logits, L->bias, engine->d_zipf_cdf, 0, 0, rows, ids, weights, L->d_slots,
                                       entry_slot, meta, false, engine->stream));
    if (engine->ep.size > 1) {
        cuda_meta_t *host = (cuda_meta_t *)malloc(sizeof(cuda_meta_t) * (size_t)rows * k);
        if (host == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "autotune: out of memory");
        cudaError_t e = cudaMemcpyAsync(host, meta, sizeof(cuda_meta_t) * (size_t)rows * k, cudaMemcpyDeviceToHost,
                                        engine->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(engine->stream);
        for (size_t i = 0; e == cudaSuccess && i < (size_t)rows * k; i++) {
            const int slot = host[i].local_slot;
            host[i] = slot / S == engine->ep.rank ? cuda_meta_t{slot % S, host[i].weight} : cuda_meta_t{-1, 0.0f};
        }
        if (e == cudaSuccess)
            e = cudaMemcpyAsync(meta, host, sizeof(cuda_meta_t) * (size_t)rows * k, cudaMemcpyHostToDevice,
                                engine->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(engine->stream);
        free(host);
        MOE_CUDA_TRY(e);
    }
    *rows_out = x;
    *meta_out = meta;
    return MOE_OK;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median ms of the expert stage with `impl` on the current dummy step. */
static moe_err_t time_impl(moe_cuda_engine_t *engine, moe_gemm_impl_t impl, const bf16 *rows,
                           const cuda_meta_t *meta, int n_rows, cudaEvent_t start, cudaEvent_t stop, double *ms_out,
                           char *msg, size_t msg_size) {
    double ms[MOE_TUNE_ITERS];
    bf16 *partial = (bf16 *)moe_cuda_reserve(&engine->ws.chunk[0].partial,
                                             sizeof(bf16) * (size_t)n_rows * engine->cfg.model.hidden, msg, msg_size);
    if (partial == nullptr) return MOE_ERR_NOMEM;
    for (int it = -1; it < MOE_TUNE_ITERS; it++) {
        MOE_CUDA_TRY(cudaEventRecord(start, engine->stream));
        MOE_TRY(moe_cuda_experts(engine, &engine->layers[0], impl, rows, meta, n_rows, partial, nullptr, nullptr, msg, msg_size));
        MOE_CUDA_TRY(cudaEventRecord(stop, engine->stream));
        MOE_CUDA_TRY(cudaEventSynchronize(stop));
        float elapsed = 0.0f;
        MOE_CUDA_TRY(cudaEventElapsedTime(&elapsed, start, stop));
        if (it >= 0) ms[it] = elapsed;
    }
    qsort(ms, MOE_TUNE_ITERS, sizeof ms[0], compare_doubles);
    *ms_out = ms[MOE_TUNE_ITERS / 2];
    return MOE_OK;
}

static moe_err_t tune(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    if (engine->n_layers == 0) return MOE_OK;
    cudaEvent_t start, stop;
    MOE_CUDA_TRY(cudaEventCreate(&start));
    cudaError_t e = cudaEventCreate(&stop);
    if (e != cudaSuccess) {
        cudaEventDestroy(start);
        MOE_CUDA_TRY(e);
    }
    moe_err_t ret = MOE_OK;
    const int last = max_bucket(engine);
    /* the model's routing too, where the layer routes on the device */
    const int n_dists = engine->cfg.model.routing.method == MOE_ROUTE_CLIENT ? DIST_MODEL : DIST_COUNT;
    moe_log(MOE_LOG_INFO, "autotune", "rank %d: timing cublas%s on 1..%d received rows (%d buckets)", engine->ep.rank,
            engine->own_grouped_ok ? " and grouped" : "", 1 << last, last + 1);
    for (int b = 0; ret == MOE_OK && b <= last; b++) {
        const int rows = 1 << b;
        double total[MOE_IMPL_COUNT] = {}, model[MOE_IMPL_COUNT] = {};
        for (int dist = 0; ret == MOE_OK && dist < n_dists; dist++) {
            bf16 *x = nullptr;
            cuda_meta_t *meta = nullptr;
            ret = dist == DIST_MODEL ? model_step(engine, rows, &x, &meta, msg, msg_size)
                                     : dummy_step(engine, rows, dist, &x, &meta, msg, msg_size);
            for (int i = 0; ret == MOE_OK && i < MOE_IMPL_COUNT; i++) {
                if (i == MOE_IMPL_GROUPED && !engine->own_grouped_ok) continue;
                double ms = 0;
                ret = time_impl(engine, (moe_gemm_impl_t)i, x, meta, rows, start, stop, &ms, msg, msg_size);
                if (ret != MOE_OK && i == MOE_IMPL_GROUPED) { /* cannot run here after all: leave it out */
                    moe_log(MOE_LOG_WARN, "autotune", "rank %d: grouped failed on %d rows (%s); cublas only",
                            engine->ep.rank, rows, msg);
                    (void)cudaGetLastError();
                    engine->own_grouped_ok = false;
                    ret = MOE_OK;
                }
                total[i] += ms;
                if (dist == DIST_MODEL) model[i] = ms;
            }
        }
        if (ret != MOE_OK) break;
        moe_gemm_impl_t best = MOE_IMPL_CUBLAS;
        if (engine->own_grouped_ok && total[MOE_IMPL_GROUPED] < total[MOE_IMPL_CUBLAS]) best = MOE_IMPL_GROUPED;
        engine->gemm_table[b] = best;
        for (int i = 0; i < MOE_IMPL_COUNT; i++) engine->tune_ms[b][i] = total[i] / n_dists;
        char routed[96] = "";
        if (n_dists > DIST_MODEL)
            snprintf(routed, sizeof routed, " (on the model's routing: %.3f, %.3f)", model[0], model[1]);
        moe_log(MOE_LOG_INFO, "autotune", "rank %d: %d rows: cublas %.3f ms, grouped %.3f ms%s -> %s",
                engine->ep.rank, rows, total[0] / n_dists, total[1] / n_dists, routed, impl_names[best]);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    for (int b = last + 1; ret == MOE_OK && b < MOE_GEMM_BUCKETS; b++) engine->gemm_table[b] = engine->gemm_table[last];
    return ret;
}

moe_err_t moe_cuda_autotune(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    memset(engine->tune_ms, 0, sizeof engine->tune_ms);
    const moe_gemm_kind_t kind = engine->cfg.moe.gemm;
    if (kind != MOE_GEMM_AUTO) {
        moe_gemm_impl_t impl = kind == MOE_GEMM_GROUPED ? MOE_IMPL_GROUPED : MOE_IMPL_CUBLAS;
        for (int b = 0; b < MOE_GEMM_BUCKETS; b++) engine->gemm_table[b] = impl;
        engine->tuned = false;
        describe(engine, impl_names[impl]);
        return MOE_OK;
    }
    char key[512];
    key_of(engine, key, sizeof key);
    const char *cache = engine->cfg.moe.autotune.cache;
    bool cached = cache[0] != '\0' && load_cache(engine, cache, key);
    if (!cached) {
        MOE_TRY(tune(engine, msg, msg_size));
        if (cache[0] != '\0') save_cache(engine, cache, key);
    }
    engine->tuned = true;
    describe(engine, cached ? "auto (from the cache)" : "auto (tuned)");
    moe_log(MOE_LOG_INFO, "autotune", "rank %d: expert GEMM %s", engine->ep.rank, engine->gemm_text);
    return MOE_OK;
}

/* ---- moe.comm auto ---------------------------------------------------------
 * Both exchanges (expert math skipped) on n = 1, 2, 4, ... tokens per rank;
 * allgather is kept up to the last n where it was at least as fast. The
 * slowest rank's median decides, so every rank gets the same threshold (the
 * exchange is a collective: all ranks must pick the same one). */

#define MOE_COMM_TUNE_MAX 1024

static moe_err_t time_exchange(moe_cuda_engine_t *engine, int n, int threshold, const bf16 *x, const int32_t *ids,
                               const float *weights, float *out, cudaEvent_t start, cudaEvent_t stop,
                               double *ms_out, char *msg, size_t msg_size) {
    const int saved = engine->allgather_max_tokens;
    engine->allgather_max_tokens = threshold;
    double ms[MOE_TUNE_ITERS] = {};
    moe_err_t ret = MOE_OK;
    bool failed_anywhere = false;
    for (int it = -1; it < MOE_TUNE_ITERS; it++) {
        /* a barrier that also agrees every rank is still fine, so that a
         * rank's failure stops all of them at the same point */
        int ok = ret == MOE_OK;
        if (MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, engine->ep.comm) != MPI_SUCCESS) ok = 0;
        if (!ok) {
            failed_anywhere = true;
            break;
        }
        cudaEventRecord(start, engine->stream);
        ret = moe_cuda_forward_chunk(engine, &engine->layers[0], x, n, n, ids, weights, out, true, msg, msg_size);
        cudaEventRecord(stop, engine->stream);
        cudaError_t e = cudaEventSynchronize(stop);
        float elapsed = 0.0f;
        if (ret == MOE_OK && e == cudaSuccess) e = cudaEventElapsedTime(&elapsed, start, stop);
        if (ret == MOE_OK && e != cudaSuccess)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: %s", cudaGetErrorString(e));
        if (it >= 0) ms[it] = elapsed;
    }
    engine->allgather_max_tokens = saved;
    qsort(ms, MOE_TUNE_ITERS, sizeof ms[0], compare_doubles);
    /* the slowest rank's median, and whether any rank failed after the last vote */
    double result[2] = {ms[MOE_TUNE_ITERS / 2], ret != MOE_OK || failed_anywhere ? 1.0 : 0.0};
    if (MPI_Allreduce(MPI_IN_PLACE, result, 2, MPI_DOUBLE, MPI_MAX, engine->ep.comm) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe.comm auto: MPI_Allreduce failed");
    if (result[1] > 0)
        return ret != MOE_OK ? ret
                             : moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: another rank's timing failed");
    *ms_out = result[0];
    return MOE_OK;
}

moe_err_t moe_cuda_tune_comm(moe_cuda_engine_t *engine, char *msg, size_t msg_size) {
    const moe_comm_kind_t comm = engine->cfg.moe.comm;
    engine->allgather_max_tokens = comm == MOE_COMM_ALLGATHER ? 0x7fffffff : -1;
    /* the exact combine returns entries over alltoall (a reduce-scatter would sum them) */
    if (comm != MOE_COMM_AUTO || engine->ep.size == 1 || engine->n_layers == 0 || engine->exact) return MOE_OK;
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k, E = engine->cfg.model.experts;
    const size_t n_max = MOE_COMM_TUNE_MAX;
    /* every setup step records its failure instead of returning: the ranks
     * vote on it below, before any collective timing */
    bf16 *x = (bf16 *)moe_cuda_reserve(&engine->ws.x, sizeof(bf16) * n_max * H, msg, msg_size);
    float *out = (float *)moe_cuda_reserve(&engine->ws.out, sizeof(float) * n_max * H, msg, msg_size);
    moe_err_t ret = x != nullptr && out != nullptr ? MOE_OK : MOE_ERR_NOMEM;
    if (ret == MOE_OK) {
        cudaError_t e = moe_cuda_synth_launch(x, nullptr, n_max * H, 0xc0ffeeull + engine->ep.rank, 0, 99, 0, 1, 0,
                                              engine->stream);
        if (e != cudaSuccess)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: %s", cudaGetErrorString(e));
    }
    /* host routing for client-routed models: distinct experts, spread evenly */
    int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * n_max * k);
    float *weights = (float *)malloc(sizeof(float) * n_max * k);
    cudaEvent_t start = nullptr, stop = nullptr;
    if (ret == MOE_OK && (ids == nullptr || weights == nullptr))
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "moe.comm auto: out of memory");
    for (size_t p = 0; ret == MOE_OK && p < n_max * k; p++)
        ids[p] = (int32_t)((p / k * 7 + p % k) % (size_t)E), weights[p] = 1.0f / (float)k;
    if (ret == MOE_OK && (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess))
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: cudaEventCreate failed");
    /* the timing is collective: every rank's setup must have worked */
    int ready = ret == MOE_OK;
    if (MPI_Allreduce(MPI_IN_PLACE, &ready, 1, MPI_INT, MPI_MIN, engine->ep.comm) != MPI_SUCCESS) ready = 0;
    if (ret == MOE_OK && !ready)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: another rank could not set up the timing");
    int n = 1;
    for (; ret == MOE_OK && n <= MOE_COMM_TUNE_MAX; n *= 2) {
        double a2a = 0, ag = 0;
        ret = time_exchange(engine, n, -1, x, ids, weights, out, start, stop, &a2a, msg, msg_size);
        if (ret == MOE_OK) ret = time_exchange(engine, n, 0x7fffffff, x, ids, weights, out, start, stop, &ag, msg, msg_size);
        if (ret == MOE_OK && engine->ep.rank == 0)
            moe_log(MOE_LOG_INFO, "comm", "%d tokens/rank: alltoall %.3f ms, allgather %.3f ms", n, a2a, ag);
        if (ret != MOE_OK || ag > a2a) break;
    }
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
    free(ids);
    free(weights);
    if (ret != MOE_OK) return ret;
    engine->allgather_max_tokens = n / 2 >= 1 ? n / 2 : -1;
    if (engine->ep.rank == 0 && engine->allgather_max_tokens <= 0)
        moe_log(MOE_LOG_INFO, "comm", "moe.comm auto: alltoall for every chunk (allgather slower already at 1 token)");
    else if (engine->ep.rank == 0)
        moe_log(MOE_LOG_INFO, "comm", "moe.comm auto: allgather up to %d tokens per rank per chunk, alltoall above",
                engine->allgather_max_tokens);
    return MOE_OK;
}
