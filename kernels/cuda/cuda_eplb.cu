/* cuda_eplb: EPLB on the CUDA backend (DESIGN §6) — each layer's slot
 * table (host and device copies), and migration: a layer's new placement
 * is filled into shadow expert buffers on the aux_balancer stream (held
 * experts copied device to device, the others regenerated on the device
 * when synthetic or read from the memory-mapped model through pinned
 * staging), then swapped in. The daemon calls it at a step boundary agreed
 * by every rank, when no forward is in flight. */
#include "cuda_internal.h"

extern "C" {
#include "../moe_weights.h"
}

moe_err_t moe_cuda_layer_slots(moe_cuda_engine_t *engine, cuda_layer_t *L, const int *placement, char *msg,
                               size_t msg_size) {
    moe_slot_table_t *table = (moe_slot_table_t *)malloc(sizeof *table);
    if (table == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: out of memory");
    moe_err_t ret = MOE_OK;
    if (placement == nullptr) *table = engine->slots;
    else
        ret = moe_slots_from_placement(placement, engine->slots.n_slots, engine->cfg.model.experts, engine->ep.size,
                                       table, msg, msg_size);
    moe_slot_table_t *device = nullptr;
    if (ret == MOE_OK && cudaMalloc((void **)&device, sizeof *device) != cudaSuccess) {
        (void)cudaGetLastError();
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cuda: cannot allocate the slot table of layer %d", L->layer);
    }
    if (ret == MOE_OK) {
        cudaError_t e = cudaMemcpy(device, table, sizeof *table, cudaMemcpyHostToDevice);
        if (e != cudaSuccess)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda: uploading the slot table: %s",
                              cudaGetErrorString(e));
    }
    if (ret != MOE_OK) {
        free(table);
        cudaFree(device);
        return ret;
    }
    free(L->slots);
    cudaFree(L->d_slots);
    L->slots = table;
    L->d_slots = device;
    moe_cuda_graph_invalidate(engine); /* the table's address is in them */
    return MOE_OK;
}

/* Expert `expert` of layer L into slot buffers w13 [2I, H] and w2 [H, I]
 * from the model: synthetic (generated on the balancer stream) or the file
 * (float32 on the host -> bf16 in pinned staging -> device). */
static moe_err_t load_expert(moe_cuda_engine_t *engine, cuda_layer_t *L, moe_weights_t *weights, int expert,
                             bf16 *w13, bf16 *w2, float *host, bf16 *staging, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate;
    cudaStream_t stream = engine->migration_stream;
    if (weights == nullptr) {
        const uint64_t seed = m->weights.seed;
        MOE_CUDA_TRY(moe_cuda_synth_launch(w13, nullptr, I * H, seed, L->layer, MOE_SYNTH_W1, expert, (int)H, 0, stream));
        MOE_CUDA_TRY(moe_cuda_synth_launch(w13 + I * H, nullptr, I * H, seed, L->layer, MOE_SYNTH_W3, expert, (int)H, 0,
                                           stream));
        MOE_CUDA_TRY(moe_cuda_synth_launch(w2, nullptr, H * I, seed, L->layer, MOE_SYNTH_W2, expert, (int)I, 0, stream));
        return MOE_OK;
    }
    MOE_TRY(moe_weights_expert(weights, L->layer, expert, host, host + I * H, host + 2 * I * H, msg, msg_size));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream)); /* the staging buffer is free again */
    for (size_t i = 0; i < 3 * I * H; i++) staging[i] = __float2bfloat16(host[i]);
    MOE_CUDA_TRY(cudaMemcpyAsync(w13, staging, sizeof(bf16) * 2 * I * H, cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(cudaMemcpyAsync(w2, staging + 2 * I * H, sizeof(bf16) * H * I, cudaMemcpyHostToDevice, stream));
    return MOE_OK;
}

/* The shadow buffers filled for `table`: every local slot's expert, from a
 * slot holding it now when there is one. *bytes_loaded: bytes read from the
 * model (or regenerated), not copied on the device. */
static moe_err_t fill_shadow(moe_cuda_engine_t *engine, cuda_layer_t *L, const moe_slot_table_t *table, bf16 *w13,
                             bf16 *w2, int64_t *bytes_loaded, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate, spr = (size_t)table->slots_per_rank;
    const size_t first = (size_t)engine->ep.rank * spr;
    moe_weights_t *weights = nullptr;
    float *host = nullptr;
    bf16 *staging = nullptr;
    moe_err_t ret = MOE_OK;
    *bytes_loaded = 0;
    for (size_t s = 0; ret == MOE_OK && s < spr; s++) {
        const int expert = table->slot_expert[first + s];
        size_t old = spr;
        for (size_t o = 0; o < spr && old == spr; o++)
            if (L->slots->slot_expert[first + o] == expert) old = o;
        if (old < spr) {
            cudaError_t e = cudaMemcpyAsync(w13 + s * 2 * I * H, L->w13 + old * 2 * I * H, sizeof(bf16) * 2 * I * H,
                                            cudaMemcpyDeviceToDevice, engine->migration_stream);
            if (e == cudaSuccess)
                e = cudaMemcpyAsync(w2 + s * H * I, L->w2 + old * H * I, sizeof(bf16) * H * I,
                                    cudaMemcpyDeviceToDevice, engine->migration_stream);
            if (e != cudaSuccess)
                ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "migrate: device copy: %s", cudaGetErrorString(e));
            continue;
        }
        if (m->weights.format == MOE_WEIGHTS_SAFETENSORS && weights == nullptr) {
            ret = moe_weights_open(m, &weights, msg, msg_size);
            host = ret == MOE_OK ? (float *)malloc(sizeof(float) * 3 * I * H) : nullptr;
            if (ret == MOE_OK && (host == nullptr || cudaMallocHost((void **)&staging, sizeof(bf16) * 3 * I * H) !=
                                                         cudaSuccess)) {
                (void)cudaGetLastError();
                staging = nullptr;
                ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "migrate: out of host memory");
            }
            if (ret != MOE_OK) break;
        }
        ret = load_expert(engine, L, weights, expert, w13 + s * 2 * I * H, w2 + s * H * I, host, staging, msg, msg_size);
        *bytes_loaded += (int64_t)(3 * H * I * sizeof(bf16));
    }
    cudaError_t e = cudaStreamSynchronize(engine->migration_stream);
    if (ret == MOE_OK && e != cudaSuccess)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "migrate: %s", cudaGetErrorString(e));
    moe_weights_close(weights);
    free(host);
    if (staging != nullptr) cudaFreeHost(staging);
    return ret;
}

/* The background half: runs on the loader thread. */
static moe_err_t fill_migration(void *arg, char *msg, size_t msg_size) {
    moe_cuda_engine_t *engine = (moe_cuda_engine_t *)arg;
    MOE_CUDA_TRY(cudaSetDevice(engine->device)); /* a new host thread starts on device 0 */
    return fill_shadow(engine, engine->migration.layer, engine->migration.table, engine->migration.w13,
                       engine->migration.w2, &engine->migration.bytes, msg, msg_size);
}

static void drop_migration(moe_cuda_engine_t *engine) {
    cudaFree(engine->migration.w13);
    cudaFree(engine->migration.w2);
    free(engine->migration.table);
    engine->migration.w13 = engine->migration.w2 = nullptr;
    engine->migration.table = nullptr;
    engine->migration.active = false;
}

extern "C" moe_err_t moe_cuda_migrate_begin(moe_cuda_engine_t *engine, int layer_id, const int *slot_expert,
                                            char *msg, size_t msg_size) {
    if (engine->migration.active)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: layer %d is still migrating",
                           engine->migration.layer->layer);
    cuda_layer_t *L = nullptr;
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer_id) L = &engine->layers[i];
    if (L == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: layer %d is not served", layer_id);
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = m->hidden, I = m->moe_intermediate, spr = (size_t)engine->slots.slots_per_rank;
    moe_slot_table_t *table = (moe_slot_table_t *)malloc(sizeof *table);
    if (table == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "migrate: out of memory");
    moe_err_t ret = moe_slots_from_placement(slot_expert, engine->slots.n_slots, m->experts, engine->ep.size, table,
                                             msg, msg_size);
    if (ret != MOE_OK) {
        free(table);
        return ret;
    }
    engine->migration.layer = L;
    engine->migration.table = table;
    engine->migration.active = true;
    if (cudaMalloc((void **)&engine->migration.w13, sizeof(bf16) * spr * 2 * I * H) != cudaSuccess ||
        cudaMalloc((void **)&engine->migration.w2, sizeof(bf16) * spr * H * I) != cudaSuccess) {
        (void)cudaGetLastError();
        drop_migration(engine);
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM,
                           "migrate: no device memory for layer %d's shadow slots (%.1f MiB)", layer_id,
                           sizeof(bf16) * spr * 3.0 * I * H / 1048576.0);
    }
    ret = moe_task_start(&engine->migration.task, fill_migration, engine, msg, msg_size);
    if (ret != MOE_OK) drop_migration(engine);
    return ret;
}

extern "C" int moe_cuda_migrate_poll(moe_cuda_engine_t *engine) {
    return engine->migration.active ? moe_task_poll(&engine->migration.task) : MOE_TASK_FAILED;
}

extern "C" moe_err_t moe_cuda_migrate_end(moe_cuda_engine_t *engine, bool commit, int64_t *bytes_loaded, char *msg,
                                          size_t msg_size) {
    if (!engine->migration.active) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: nothing in flight");
    moe_err_t ret = moe_task_join(&engine->migration.task, msg, msg_size);
    if (bytes_loaded != nullptr) *bytes_loaded = engine->migration.bytes;
    cuda_layer_t *L = engine->migration.layer;
    /* the swap: nothing in flight reads the old buffers (a step boundary) */
    if (ret == MOE_OK && commit) {
        cudaError_t e = cudaStreamSynchronize(engine->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(engine->aux);
        if (e == cudaSuccess) e = cudaMemcpy(L->d_slots, engine->migration.table, sizeof(moe_slot_table_t),
                                             cudaMemcpyHostToDevice);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "migrate: %s", cudaGetErrorString(e));
        }
    }
    if (ret != MOE_OK || !commit) {
        drop_migration(engine);
        return ret;
    }
    cudaFree(L->w13);
    cudaFree(L->w2);
    free(L->slots);
    L->w13 = engine->migration.w13, L->w2 = engine->migration.w2, L->slots = engine->migration.table;
    engine->migration.w13 = engine->migration.w2 = nullptr;
    engine->migration.table = nullptr;
    engine->migration.active = false;
    moe_cuda_graph_invalidate(engine); /* the old weights' addresses are in them */
    return MOE_OK;
}

extern "C" moe_err_t moe_cuda_migrate(moe_cuda_engine_t *engine, int layer_id, const int *slot_expert,
                                      int64_t *bytes_loaded, char *msg, size_t msg_size) {
    MOE_TRY(moe_cuda_migrate_begin(engine, layer_id, slot_expert, msg, msg_size));
    return moe_cuda_migrate_end(engine, true, bytes_loaded, msg, msg_size);
}
