/* cuda_graph: small steps replayed as CUDA graphs (DESIGN §4).
 *
 * A step of a few tokens is a handful of short kernels (router, routing,
 * the two decode kernels): on an H200 a Qwen3-shaped layer's kernels take
 * ~26 µs back to back but ~33 µs issued one call at a time, where the
 * host's launches, event records and waits set the pace. A graph is one
 * launch. Each served layer keeps a graph per token count up to
 * MOE_CUDA_GRAPH_TOKENS (default 16): the first step of a size runs as
 * usual (its buffers are reserved then), the second is captured on the
 * main stream and launched, later ones are launched. What a graph bakes in
 * — buffer addresses, weights, the slot table's address, the GEMM table —
 * may change: a graph is kept only while the epoch it was captured at is
 * current (moe_cuda_graph_epoch: workspace growth anywhere, a reload, a
 * migration or a new slot table), and while the step's input and output
 * buffers and its counting are the captured ones. A capture that fails
 * (a call that cannot be captured) runs the step as usual and is not
 * tried again in that epoch. The caller decides which steps may be
 * captured (cuda_forward.cu). */
#include "cuda_internal.h"

/* Every growth of a workspace buffer anywhere moves it (moe_cuda_reserve). */
static unsigned long long reserve_moves;
/* This thread is capturing a step: nothing may be allocated or freed, and
 * the step waits for no event recorded outside it. */
static thread_local bool capturing_here;

void moe_cuda_count_reserve_move(void) { __atomic_add_fetch(&reserve_moves, 1, __ATOMIC_RELAXED); }

bool moe_cuda_is_capturing(void) { return capturing_here; }

uint64_t moe_cuda_graph_epoch(const moe_cuda_engine_t *engine) {
    return engine->graphs.epoch + __atomic_load_n(&reserve_moves, __ATOMIC_RELAXED);
}

void moe_cuda_graph_invalidate(moe_cuda_engine_t *engine) { engine->graphs.epoch++; }

moe_err_t moe_cuda_graph_init(moe_cuda_engine_t *engine, int max_tokens, char *msg, size_t msg_size) {
    engine->graphs.max_tokens = max_tokens;
    if (max_tokens <= 0 || engine->n_layers <= 0) return MOE_OK;
    engine->graphs.entry =
        (cuda_graph_t *)calloc((size_t)engine->n_layers * (size_t)max_tokens, sizeof(cuda_graph_t));
    if (engine->graphs.entry == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda graphs: out of memory");
    return MOE_OK;
}

static void drop(cuda_graph_t *g) {
    if (g->exec != nullptr) cudaGraphExecDestroy(g->exec);
    g->exec = nullptr;
}

void moe_cuda_graph_destroy(moe_cuda_engine_t *engine) {
    const size_t n = (size_t)engine->n_layers * (size_t)(engine->graphs.max_tokens > 0 ? engine->graphs.max_tokens : 0);
    for (size_t i = 0; engine->graphs.entry != nullptr && i < n; i++) drop(&engine->graphs.entry[i]);
    free(engine->graphs.entry);
    engine->graphs.entry = nullptr;
}

/* Buffer set 0's events (a graph's step is one chunk: set 0), recorded
 * again on the main stream outside any capture: a wait on an event last
 * recorded inside a capture fails, and after a launch they stand for the
 * step the graph ran. */
static cudaError_t record_events(moe_cuda_engine_t *engine) {
    for (int e = 0; e < EV_COUNT; e++) {
        cudaError_t err = cudaEventRecord(engine->ev[0][e], engine->stream);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

/* Captures step(ctx) into g->exec; false (g->exec NULL) when it cannot be
 * captured. Nothing runs: the caller launches the graph. */
static bool capture(moe_cuda_engine_t *engine, cuda_graph_t *g, moe_cuda_step_fn_t step, void *ctx) {
    const size_t forms = sizeof engine->grouped_runs / sizeof engine->grouped_runs[0];
    long long runs[sizeof engine->grouped_runs / sizeof engine->grouped_runs[0]];
    long long shared_runs[sizeof engine->shared_runs / sizeof engine->shared_runs[0]];
    memcpy(runs, engine->grouped_runs, sizeof runs);
    memcpy(shared_runs, engine->shared_runs, sizeof shared_runs);
    char why[512] = "";
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamBeginCapture(engine->stream, cudaStreamCaptureModeThreadLocal);
    moe_err_t ret = MOE_OK;
    if (e == cudaSuccess) {
        capturing_here = true;
        ret = step(ctx, why, sizeof why);
        /* the counting branch (front() forks it onto aux_balancer) joins
         * the captured step, also when the step failed after the fork */
        if (engine->counting) (void)cudaStreamWaitEvent(engine->stream, engine->ev[0][EV_COUNTED], 0);
        capturing_here = false;
        cudaError_t end = cudaStreamEndCapture(engine->stream, &graph);
        if (e == cudaSuccess) e = end;
        cudaStreamCaptureStatus left = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(engine->balancer, &left) != cudaSuccess || left != cudaStreamCaptureStatusNone)
            moe_log(MOE_LOG_ERROR, "cuda", "rank %d: aux_balancer still in a graph capture after a failed one",
                    engine->ep.rank);
    }
    if (ret == MOE_OK && e == cudaSuccess) e = cudaGraphInstantiate(&g->exec, graph, 0);
    if (graph != nullptr) cudaGraphDestroy(graph);
    for (size_t i = 0; i < forms; i++) { /* what a launch of it adds */
        g->grouped_runs[i] = engine->grouped_runs[i] - runs[i];
        engine->grouped_runs[i] = runs[i];
    }
    for (size_t i = 0; i < sizeof shared_runs / sizeof shared_runs[0]; i++) {
        g->shared_runs[i] = engine->shared_runs[i] - shared_runs[i];
        engine->shared_runs[i] = shared_runs[i];
    }
    if (ret != MOE_OK || e != cudaSuccess) {
        (void)cudaGetLastError();
        drop(g);
        moe_log(MOE_LOG_DEBUG, "cuda", "a %d-token step is not captured as a graph: %s", g->tokens,
                ret != MOE_OK ? why : cudaGetErrorString(e));
    }
    if (record_events(engine) != cudaSuccess) { /* the usual path would wait on a captured record */
        (void)cudaGetLastError();
        drop(g);
    }
    return g->exec != nullptr;
}

/* Launches g after everything on aux_balancer so far (a previous step's
 * counting, or the reset of a failed one's counts: the graph's counting
 * must come after them, as on the stream it would run on). */
static cudaError_t launch(moe_cuda_engine_t *engine, cuda_graph_t *g) {
    cudaError_t e = cudaEventRecord(engine->ev[0][EV_COUNTED], engine->balancer);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(engine->stream, engine->ev[0][EV_COUNTED], 0);
    if (e == cudaSuccess) e = cudaGraphLaunch(g->exec, engine->stream);
    return e;
}

moe_err_t moe_cuda_graph_run(moe_cuda_engine_t *engine, cuda_layer_t *L, int n_tokens, const void *x,
                             const void *out, moe_cuda_step_fn_t step, void *ctx, char *msg, size_t msg_size) {
    const size_t layer_index = (size_t)(L - engine->layers);
    cuda_graph_t *g = &engine->graphs.entry[layer_index * (size_t)engine->graphs.max_tokens + (size_t)(n_tokens - 1)];
    const uint64_t epoch = moe_cuda_graph_epoch(engine);
    if (g->epoch != epoch || g->x != x || g->out != out || g->counting != engine->counting) {
        drop(g);
        g->epoch = epoch, g->x = x, g->out = out, g->counting = engine->counting, g->tokens = n_tokens;
        g->runs = 0, g->failed = false;
    }
    if (g->exec == nullptr) {
        /* the first step of this size reserves its buffers: captured
         * later, it reserves nothing (capture allows no allocation) */
        if (g->failed || g->runs++ == 0) return step(ctx, msg, msg_size);
        if (!capture(engine, g, step, ctx) || moe_cuda_graph_epoch(engine) != epoch) {
            drop(g); /* not capturable, or a buffer moved meanwhile: this step as usual */
            g->failed = g->epoch == moe_cuda_graph_epoch(engine);
            return step(ctx, msg, msg_size);
        }
        if (engine->graphs.captured++ == 0)
            moe_log(MOE_LOG_INFO, "cuda", "rank %d: a %d-token step of layer %d captured as a CUDA graph; steps of up "
                    "to %d tokens run as graphs (MOE_CUDA_GRAPH_TOKENS)", engine->ep.rank, n_tokens, L->layer,
                    engine->graphs.max_tokens);
    }
    cudaError_t e = launch(engine, g);
    if (e != cudaSuccess) { /* nothing ran; not again in this epoch: this step as usual */
        (void)cudaGetLastError();
        moe_log(MOE_LOG_WARN, "cuda", "rank %d: launching the graph of a %d-token step of layer %d: %s; running "
                "steps of that size without it", engine->ep.rank, n_tokens, L->layer, cudaGetErrorString(e));
        drop(g);
        g->failed = true;
        return step(ctx, msg, msg_size);
    }
    MOE_CUDA_TRY(record_events(engine));
    for (size_t i = 0; i < sizeof g->grouped_runs / sizeof g->grouped_runs[0]; i++)
        engine->grouped_runs[i] += g->grouped_runs[i];
    for (size_t i = 0; i < sizeof g->shared_runs / sizeof g->shared_runs[0]; i++)
        engine->shared_runs[i] += g->shared_runs[i];
    engine->graphs.launched++;
    L->step++;
    return MOE_OK;
}

extern "C" void moe_cuda_graph_counts(const moe_cuda_engine_t *engine, long long *captured, long long *launched) {
    *captured = engine->graphs.captured;
    *launched = engine->graphs.launched;
}
