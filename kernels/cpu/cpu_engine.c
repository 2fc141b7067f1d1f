/* cpu_engine: builds the CPU engine — validates shapes against the rank
 * count, builds the slot table, checks that the weights fit in memory, and
 * loads the router, bias and shared expert of every layer and the experts of
 * this rank's slots. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../config/moe_log.h"
#include "../moe_eplb.h"
#include "../moe_weights.h"
#include "cpu_internal.h"

void *moe_cpu_reserve(moe_cpu_buffer_t *buffer, size_t size) {
    if (size <= buffer->size && buffer->ptr != NULL) return buffer->ptr;
    size_t grown = buffer->size * 2 > size ? buffer->size * 2 : size;
    if (grown == 0) grown = 64;
    void *ptr = realloc(buffer->ptr, grown);
    if (ptr == NULL) return NULL;
    buffer->ptr = ptr;
    buffer->size = grown;
    return ptr;
}

double moe_cpu_flops(const moe_config_t *cfg, int64_t n_tokens) {
    const moe_model_config_t *m = &cfg->model;
    double per_token = 0.0;
    if (moe_route_needs_logits(m->routing.method)) per_token += 2.0 * m->hidden * m->experts;
    per_token += (double)m->top_k * 6.0 * m->hidden * m->moe_intermediate;
    per_token += 6.0 * m->hidden * m->shared_intermediate;
    return per_token * (double)n_tokens;
}

/* Bytes of float32 weights one rank holds. */
static double engine_bytes(const moe_config_t *cfg, int slots_per_rank) {
    const moe_model_config_t *m = &cfg->model;
    double per_layer = (double)m->experts * m->hidden + m->experts +
                       3.0 * m->hidden * m->shared_intermediate + m->hidden +
                       3.0 * (double)slots_per_rank * m->hidden * m->moe_intermediate;
    return per_layer * m->n_layers * sizeof(float);
}

static void layer_free(moe_cpu_layer_t *layer) {
    free(layer->slots);
    free(layer->router);
    free(layer->bias);
    free(layer->shared_w1);
    free(layer->shared_w3);
    free(layer->shared_w2);
    free(layer->shared_gate);
    free(layer->slot_w1);
    free(layer->slot_w3);
    free(layer->slot_w2);
}

/* placement: this layer's slot -> expert (eplb.placement_file), or NULL
 * for the configured one. */
static moe_err_t layer_load(moe_cpu_engine_t *engine, moe_weights_t *weights, int index, const int *placement,
                            char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    moe_cpu_layer_t *layer = &engine->layers[index];
    const size_t H = (size_t)m->hidden, I = (size_t)m->moe_intermediate,
                 E = (size_t)m->experts, Is = (size_t)m->shared_intermediate,
                 spr = (size_t)engine->slots.slots_per_rank;
    layer->layer = m->layer_ids[index];
    layer->slots = malloc(sizeof *layer->slots);
    if (layer->slots == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "layer %d: out of memory", layer->layer);
    *layer->slots = engine->slots;
    if (placement != NULL)
        MOE_CHECK(moe_slots_from_placement(placement, engine->slots.n_slots, m->experts, engine->ep.size, layer->slots,
                                           msg, msg_size));
    layer->router = malloc(sizeof(float) * E * H);
    layer->slot_w1 = malloc(sizeof(float) * spr * I * H);
    layer->slot_w3 = malloc(sizeof(float) * spr * I * H);
    layer->slot_w2 = malloc(sizeof(float) * spr * H * I);
    if (m->routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK) layer->bias = malloc(sizeof(float) * E);
    if (Is > 0) {
        layer->shared_w1 = malloc(sizeof(float) * Is * H);
        layer->shared_w3 = malloc(sizeof(float) * Is * H);
        layer->shared_w2 = malloc(sizeof(float) * H * Is);
        if (m->shared_expert_gate) layer->shared_gate = malloc(sizeof(float) * H);
    }
    if (layer->router == NULL || layer->slot_w1 == NULL || layer->slot_w3 == NULL ||
        layer->slot_w2 == NULL ||
        (m->routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK && layer->bias == NULL) ||
        (Is > 0 && (layer->shared_w1 == NULL || layer->shared_w3 == NULL ||
                    layer->shared_w2 == NULL || (m->shared_expert_gate && layer->shared_gate == NULL))))
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "layer %d: out of memory for weights",
                           layer->layer);
    MOE_CHECK(moe_weights_router(weights, layer->layer, layer->router, msg, msg_size));
    if (layer->bias != NULL) MOE_CHECK(moe_weights_bias(weights, layer->layer, layer->bias, msg, msg_size));
    if (Is > 0)
        MOE_CHECK(moe_weights_shared(weights, layer->layer, layer->shared_w1, layer->shared_w3,
                                     layer->shared_w2, layer->shared_gate, msg, msg_size));
    int first_slot = engine->ep.rank * engine->slots.slots_per_rank;
    for (size_t s = 0; s < spr; s++) {
        int expert = layer->slots->slot_expert[first_slot + (int)s];
        MOE_CHECK(moe_weights_expert(weights, layer->layer, expert, layer->slot_w1 + s * I * H,
                                     layer->slot_w3 + s * I * H, layer->slot_w2 + s * H * I, msg,
                                     msg_size));
    }
    return MOE_OK;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Every rank's vote (collective with more than one rank). */
static bool all_ranks_ok(moe_ep_t ep, bool ok) {
    int value = ok ? 1 : 0;
    if (ep.size > 1 && MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_INT, MPI_MIN, ep.comm) != MPI_SUCCESS) return false;
    return value == 1;
}

moe_err_t moe_cpu_create(const moe_config_t *cfg, moe_ep_t ep, moe_cpu_engine_t **out, char *msg,
                         size_t msg_size) {
    moe_err_t ret = MOE_OK;
    moe_weights_t *weights = NULL;
    int *placements = NULL;
    *out = NULL;
    moe_cpu_engine_t *engine = calloc(1, sizeof *engine);
    if (engine == NULL) {
        (void)all_ranks_ok(ep, false); /* a rank-local failure: the others are waiting to vote */
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cpu engine: out of memory");
    }
    engine->cfg = *cfg;
    engine->ep = ep;
    const moe_model_config_t *m = &engine->cfg.model;
    /* config errors: the same on every rank, so no vote (see fail_voted) */
    if (m->n_layers < 1 || m->hidden < 1 || m->moe_intermediate < 1) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "cpu engine: model has no layers or an empty shape");
        goto fail_voted;
    }
    moe_route_params_t params;
    moe_route_params_init(&params, m, NULL, 0, ep.rank, ep.size);
    MOE_CHECK_GOTO(moe_route_validate(&params, msg, msg_size), ret, fail_voted);
    MOE_CHECK_GOTO(moe_slots_build(&engine->cfg.eplb, m->experts, ep.size, &engine->slots, msg, msg_size),
                   ret, fail_voted);
    double bytes = engine_bytes(&engine->cfg, engine->slots.slots_per_rank);
    double physical = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (physical > 0 && bytes > 0.8 * physical) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM,
                          "cpu engine: rank %d needs %.1f GiB of float32 weights for %d layers, "
                          "more than 80%% of this machine's %.1f GiB; use fewer model.layers, "
                          "more ranks, or the cuda backend",
                          ep.rank, bytes / (1 << 30), m->n_layers, physical / (1 << 30));
        goto fail;
    }
    engine->n_layers = m->n_layers;
    engine->layers = calloc((size_t)m->n_layers, sizeof *engine->layers);
    if (engine->layers == NULL) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cpu engine: out of memory");
        goto fail;
    }
    if (engine->cfg.eplb.placement_file[0] != '\0') {
        /* a placement per layer, validated against the shapes */
        placements = malloc(sizeof(int) * (size_t)m->n_layers * (size_t)engine->slots.n_slots);
        if (placements == NULL) {
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "cpu engine: out of memory");
            goto fail;
        }
        MOE_CHECK_GOTO(moe_eplb_load_placement_file(engine->cfg.eplb.placement_file, m->experts,
                                                    engine->slots.n_slots, m->n_layers, m->layer_ids, placements,
                                                    msg, msg_size),
                       ret, fail);
    }
    MOE_CHECK_GOTO(moe_weights_open(m, &weights, msg, msg_size), ret, fail);
    double start = now_seconds(), last_report = start;
    for (int i = 0; i < m->n_layers; i++) {
        MOE_CHECK_GOTO(layer_load(engine, weights, i,
                                  placements != NULL ? placements + (size_t)i * engine->slots.n_slots : NULL, msg,
                                  msg_size),
                       ret, fail);
        double now = now_seconds();
        if (now - last_report > 2.0) {
            moe_log(MOE_LOG_INFO, "weights", "loaded %d/%d layers (%.1f s)", i + 1, m->n_layers,
                    now - start);
            last_report = now;
        }
    }
    moe_log(MOE_LOG_DEBUG, "weights", "rank %d: %d layers, %d slots, %.1f MiB in %.2f s", ep.rank,
            m->n_layers, engine->slots.slots_per_rank, bytes / (1 << 20), now_seconds() - start);
    moe_weights_close(weights);
    free(placements);
    weights = NULL, placements = NULL;
    /* moe.comm auto times both exchanges together: only when every rank is
     * up (a rank that failed above joins this vote, never the timing) */
    if (!all_ranks_ok(ep, true)) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cpu engine: another rank failed to start");
        goto fail_voted;
    }
    MOE_CHECK_GOTO(moe_cpu_tune_comm(engine, msg, msg_size), ret, fail_voted);
    *out = engine;
    return MOE_OK;
fail: /* a failure that may be this rank's alone (memory, files): vote */
    (void)all_ranks_ok(ep, false);
fail_voted:
    moe_weights_close(weights);
    free(placements);
    moe_cpu_destroy(engine);
    return ret;
}

void moe_cpu_destroy(moe_cpu_engine_t *engine) {
    if (engine == NULL) return;
    if (engine->migration.active) { /* wait for the loader before freeing what it reads */
        char msg[64];
        (void)moe_cpu_migrate_end(engine, false, NULL, msg, sizeof msg);
    }
    for (int i = 0; i < engine->n_layers && engine->layers != NULL; i++) layer_free(&engine->layers[i]);
    free(engine->layers);
    moe_cpu_buffer_t *buffers = (moe_cpu_buffer_t *)&engine->ws;
    for (size_t i = 0; i < sizeof engine->ws / sizeof(moe_cpu_buffer_t); i++) free(buffers[i].ptr);
    free(engine);
}

void moe_cpu_reconfigure(moe_cpu_engine_t *engine, const moe_config_t *cfg) {
    engine->cfg.moe.chunking = cfg->moe.chunking;
    engine->cfg.moe.max_tokens_per_step = cfg->moe.max_tokens_per_step;
}

int moe_cpu_slot_count(const moe_cpu_engine_t *engine) { return engine->slots.n_slots; }

const int *moe_cpu_placement(const moe_cpu_engine_t *engine, int layer) {
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer) return engine->layers[i].slots->slot_expert;
    return NULL;
}

/* EPLB migration (DESIGN §6) on the CPU: the new slots of this rank are
 * filled in fresh buffers — copied from the old buffers when this rank
 * already held that expert, else read from the weight source — and the
 * table and buffers are swapped only when all of it worked. */
/* The background half of a migration: this rank's slots of the new table
 * filled from the slots it holds now (copied) or from the model (read or
 * regenerated). Reads the live buffers only; writes only the new ones. */
static moe_err_t fill_migration(void *arg, char *msg, size_t msg_size) {
    moe_cpu_engine_t *engine = arg;
    moe_cpu_layer_t *layer = engine->migration.layer;
    const moe_slot_table_t *table = engine->migration.table;
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = (size_t)m->hidden, I = (size_t)m->moe_intermediate;
    const size_t spr = (size_t)table->slots_per_rank, first = (size_t)engine->ep.rank * spr;
    float *w1 = engine->migration.w1, *w3 = engine->migration.w3, *w2 = engine->migration.w2;
    moe_weights_t *weights = NULL;
    moe_err_t ret = MOE_OK;
    engine->migration.bytes = 0;
    const char *fail = getenv("MOE_TEST_FAIL_MIGRATION_RANK"); /* tests: this rank's loads fail */
    if (fail != NULL && atoi(fail) == engine->ep.rank)
        return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "rank %d: MOE_TEST_FAIL_MIGRATION_RANK says these loads fail",
                           engine->ep.rank);
    for (size_t s = 0; ret == MOE_OK && s < spr; s++) {
        int expert = table->slot_expert[first + s];
        size_t old = spr;
        for (size_t o = 0; o < spr && old == spr; o++)
            if (layer->slots->slot_expert[first + o] == expert) old = o;
        if (old < spr) {
            memcpy(w1 + s * I * H, layer->slot_w1 + old * I * H, sizeof(float) * I * H);
            memcpy(w3 + s * I * H, layer->slot_w3 + old * I * H, sizeof(float) * I * H);
            memcpy(w2 + s * H * I, layer->slot_w2 + old * H * I, sizeof(float) * H * I);
            continue;
        }
        if (weights == NULL) ret = moe_weights_open(m, &weights, msg, msg_size);
        if (ret == MOE_OK)
            ret = moe_weights_expert(weights, layer->layer, expert, w1 + s * I * H, w3 + s * I * H, w2 + s * H * I,
                                     msg, msg_size);
        engine->migration.bytes += (int64_t)(3 * H * I * sizeof(float));
    }
    moe_weights_close(weights);
    return ret;
}

static void drop_migration(moe_cpu_engine_t *engine) {
    free(engine->migration.w1), free(engine->migration.w3), free(engine->migration.w2);
    free(engine->migration.table);
    engine->migration.w1 = engine->migration.w3 = engine->migration.w2 = NULL;
    engine->migration.table = NULL;
    engine->migration.active = false;
}

moe_err_t moe_cpu_migrate_begin(moe_cpu_engine_t *engine, int layer_id, const int *slot_expert, char *msg,
                                size_t msg_size) {
    if (engine->migration.active)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: layer %d is still migrating",
                           engine->migration.layer->layer);
    moe_cpu_layer_t *layer = NULL;
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer_id) layer = &engine->layers[i];
    if (layer == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: layer %d is not served", layer_id);
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = (size_t)m->hidden, I = (size_t)m->moe_intermediate;
    moe_slot_table_t *table = malloc(sizeof *table);
    if (table == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "migrate: out of memory");
    moe_err_t ret = moe_slots_from_placement(slot_expert, engine->slots.n_slots, m->experts, engine->ep.size, table,
                                             msg, msg_size);
    if (ret != MOE_OK) {
        free(table);
        return ret;
    }
    const size_t spr = (size_t)table->slots_per_rank;
    engine->migration.layer = layer;
    engine->migration.table = table;
    engine->migration.w1 = malloc(sizeof(float) * spr * I * H);
    engine->migration.w3 = malloc(sizeof(float) * spr * I * H);
    engine->migration.w2 = malloc(sizeof(float) * spr * H * I);
    engine->migration.active = true;
    if (engine->migration.w1 == NULL || engine->migration.w3 == NULL || engine->migration.w2 == NULL) {
        drop_migration(engine);
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "migrate: out of memory for layer %d", layer_id);
    }
    ret = moe_task_start(&engine->migration.task, fill_migration, engine, msg, msg_size);
    if (ret != MOE_OK) drop_migration(engine);
    return ret;
}

int moe_cpu_migrate_poll(moe_cpu_engine_t *engine) {
    return engine->migration.active ? moe_task_poll(&engine->migration.task) : MOE_TASK_FAILED;
}

moe_err_t moe_cpu_migrate_end(moe_cpu_engine_t *engine, bool commit, int64_t *bytes_loaded, char *msg,
                              size_t msg_size) {
    if (!engine->migration.active) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "migrate: nothing in flight");
    moe_err_t ret = moe_task_join(&engine->migration.task, msg, msg_size);
    if (bytes_loaded != NULL) *bytes_loaded = engine->migration.bytes;
    if (ret != MOE_OK || !commit) {
        drop_migration(engine);
        return ret;
    }
    moe_cpu_layer_t *layer = engine->migration.layer;
    free(layer->slot_w1), free(layer->slot_w3), free(layer->slot_w2), free(layer->slots);
    layer->slot_w1 = engine->migration.w1, layer->slot_w3 = engine->migration.w3;
    layer->slot_w2 = engine->migration.w2, layer->slots = engine->migration.table;
    engine->migration.w1 = engine->migration.w3 = engine->migration.w2 = NULL;
    engine->migration.table = NULL;
    engine->migration.active = false;
    return MOE_OK;
}

moe_err_t moe_cpu_migrate(moe_cpu_engine_t *engine, int layer_id, const int *slot_expert, int64_t *bytes_loaded,
                          char *msg, size_t msg_size) {
    MOE_CHECK(moe_cpu_migrate_begin(engine, layer_id, slot_expert, msg, msg_size));
    return moe_cpu_migrate_end(engine, true, bytes_loaded, msg, msg_size);
}
