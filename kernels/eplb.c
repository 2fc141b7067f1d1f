/* eplb: the EPLB placement algorithm, imbalance, adoption rule and static
 * placement files (see moe_eplb.h, DESIGN §6).
 *
 * Determinism: every rank must compute the same placement from the same
 * counts, so the code uses only IEEE double +, *, / and comparisons in a
 * fixed order (C11 mode keeps -ffp-contract=off, so no FMA fusing differs
 * between builds), sorts with comparators that are total orders (qsort's instability
 * cannot show), and breaks every tie by the lower index.
 *
 * Cost: replication is O(extra slots x experts), packing O(n_slots x n_ranks
 * x slots_per_rank) in the worst case — a few million steps at the limits
 * (4096 slots, 1024 experts), run once per balancing window on the host. */
#include "moe_eplb.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    double load_per_replica;
    int expert;
} replica_t;

/* One malloc'd block of scratch, sized from the arguments, freed on every
 * path by moe_eplb_place. */
typedef struct {
    int *replicas;          /* [experts] replica count per expert id */
    int *group_experts;     /* [experts] ids of the experts of one node, ascending */
    int *expert_order;      /* [experts] experts by load, for node packing */
    int *node_of;           /* [experts] node of each expert */
    int *rank_fill;         /* [n_ranks] slots used per rank while packing */
    int *node_count;        /* [n_ranks] experts per node (n_nodes <= n_ranks) */
    int *other;             /* [n_slots] the placement of the other replication rule */
    bool spread_first;      /* replicate: one copy per rank of the group before a second */
    double *rank_load;      /* [n_ranks] load per rank while packing */
    double *node_load;      /* [n_ranks] */
    replica_t *replica;     /* [n_slots] */
} scratch_t;

/* Replicas by load per replica descending, then expert ascending: a total
 * order up to replicas of one expert, which are identical. */
static int compare_replicas(const void *a, const void *b) {
    const replica_t *x = a, *y = b;
    if (x->load_per_replica != y->load_per_replica)
        return x->load_per_replica > y->load_per_replica ? -1 : 1;
    return (x->expert > y->expert) - (x->expert < y->expert);
}

static int compare_ints(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Packing order of ranks: less load first; on equal load (zero-load
 * replicas) fewer filled slots, so that ranks fill evenly and keep room for
 * the distinct copies of later experts; then the lower rank (r < other). */
static bool rank_before(const scratch_t *scratch, int r, int other) {
    if (scratch->rank_load[r] != scratch->rank_load[other])
        return scratch->rank_load[r] < scratch->rank_load[other];
    return scratch->rank_fill[r] < scratch->rank_fill[other];
}

/* Steps 1-2 for one group (the whole job, or one node): the group's experts
 * ids[0..n_ids) (ascending) get group_ranks * slots_per_rank slots, written
 * rank-major into out[]. n_ids <= that slot count. */
static void place_group(const double *load, const int *ids, int n_ids, int group_ranks,
                        int slots_per_rank, int *out, scratch_t *scratch) {
    int group_slots = group_ranks * slots_per_rank;
    int *replicas = scratch->replicas;

    /* 1. replicate. Each extra slot halves (thirds, ...) the load of the
     * expert that is currently the hottest per replica: the greedy choice that
     * minimises the largest load per replica, which bounds the best packing.
     * With spread_first, only experts with fewer replicas than the group has
     * ranks compete while any does: routing sends a token to a copy on its own
     * rank first, so a second copy on a rank serves only the tokens of ranks
     * that hold none, and a copy on a new rank is usually worth more
     * (moe_eplb_place keeps whichever rule predicts the lower imbalance). */
    for (int i = 0; i < n_ids; i++) replicas[ids[i]] = 1;
    for (int extra = group_slots - n_ids; extra > 0; extra--) {
        int best = -1;
        for (int pass = scratch->spread_first ? 0 : 1; pass < 2 && best < 0; pass++) {
            for (int i = 0; i < n_ids; i++) {
                int e = ids[i];
                if (pass == 0 && replicas[e] >= group_ranks) continue;
                if (best < 0) {
                    best = e;
                    continue;
                }
                /* Ties: fewer replicas first, so that equal (e.g. all-zero)
                 * loads spread the extra slots round-robin instead of piling
                 * them all on the lowest id; then the lower id (ids ascend,
                 * strict <). */
                double per_replica = load[e] / replicas[e], best_per_replica = load[best] / replicas[best];
                if (per_replica > best_per_replica ||
                    (per_replica == best_per_replica && replicas[e] < replicas[best]))
                    best = e;
            }
        }
        replicas[best]++;
    }

    /* 2. pack, largest first (LPT): big items placed early leave the small
     * ones to even out the ranks at the end. */
    int n_replicas = 0;
    for (int i = 0; i < n_ids; i++) {
        int e = ids[i];
        for (int k = 0; k < replicas[e]; k++)
            scratch->replica[n_replicas++] = (replica_t){load[e] / replicas[e], e};
    }
    qsort(scratch->replica, (size_t)n_replicas, sizeof(replica_t), compare_replicas);
    for (int r = 0; r < group_ranks; r++) {
        scratch->rank_fill[r] = 0;
        scratch->rank_load[r] = 0.0;
    }
    for (int i = 0; i < n_replicas; i++) {
        int e = scratch->replica[i].expert;
        int best_any = -1, best_fresh = -1; /* least loaded with room; ... without e */
        for (int r = 0; r < group_ranks; r++) {
            if (scratch->rank_fill[r] == slots_per_rank) continue;
            if (best_any < 0 || rank_before(scratch, r, best_any)) best_any = r;
            /* A second copy on one rank serves only the tokens of ranks
             * without a copy, so it goes there only when no other rank has
             * room. */
            bool holds = false;
            for (int k = 0; k < scratch->rank_fill[r] && !holds; k++)
                holds = out[r * slots_per_rank + k] == e;
            if (!holds && (best_fresh < 0 || rank_before(scratch, r, best_fresh))) best_fresh = r;
        }
        int r = best_fresh >= 0 ? best_fresh : best_any; /* room exists: slots = replicas */
        out[r * slots_per_rank + scratch->rank_fill[r]++] = e;
        scratch->rank_load[r] += scratch->replica[i].load_per_replica;
    }
    /* Expert order within a rank makes the table independent of packing
     * order and keeps a rank's weights in id order for the loader. */
    for (int r = 0; r < group_ranks; r++)
        qsort(out + r * slots_per_rank, (size_t)slots_per_rank, sizeof(int), compare_ints);
}

/* Experts by load descending, then id ascending. qsort has no context
 * argument in C11, so the loads travel through this thread-local. */
static _Thread_local const double *order_loads;
static int compare_experts_by_load(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (order_loads[x] != order_loads[y]) return order_loads[x] > order_loads[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* Step 3: whole experts onto nodes (so all replicas of an expert, and the
 * tokens they serve, stay in one node), then steps 1-2 per node. */
static void place_hierarchical(const double *load, int experts, int n_slots, int n_nodes,
                               int ranks_per_node, int *slot_expert, scratch_t *scratch) {
    int slots_per_node = n_slots / n_nodes;
    for (int e = 0; e < experts; e++) scratch->expert_order[e] = e;
    order_loads = load;
    qsort(scratch->expert_order, (size_t)experts, sizeof(int), compare_experts_by_load);
    order_loads = NULL;
    for (int n = 0; n < n_nodes; n++) {
        scratch->node_load[n] = 0.0;
        scratch->node_count[n] = 0;
    }
    for (int i = 0; i < experts; i++) {
        int e = scratch->expert_order[i], best = -1;
        for (int n = 0; n < n_nodes; n++) {
            /* Room: each expert of a node needs one of its slots. The count
             * tie-break spreads zero-load experts, and makes the first n_nodes
             * experts land on distinct nodes, so no node ends up empty. */
            if (scratch->node_count[n] == slots_per_node) continue;
            if (best < 0 || scratch->node_load[n] < scratch->node_load[best] ||
                (scratch->node_load[n] == scratch->node_load[best] &&
                 scratch->node_count[n] < scratch->node_count[best]))
                best = n;
        }
        scratch->node_of[e] = best;
        scratch->node_load[best] += load[e];
        scratch->node_count[best]++;
    }
    for (int n = 0; n < n_nodes; n++) {
        int n_ids = 0;
        for (int e = 0; e < experts; e++)
            if (scratch->node_of[e] == n) scratch->group_experts[n_ids++] = e;
        place_group(load, scratch->group_experts, n_ids, ranks_per_node,
                    slots_per_node / ranks_per_node, slot_expert + n * slots_per_node, scratch);
    }
}

moe_err_t moe_eplb_place(const double *expert_load, int experts, int n_slots, int n_ranks,
                         int ranks_per_node, int *slot_expert, double *rank_load, char *msg,
                         size_t msg_size) {
    if (expert_load == NULL || slot_expert == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "eplb: expert_load and slot_expert are required");
    if (experts < 1 || experts > MOE_MAX_EXPERTS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "eplb: %d experts out of range [1, %d]",
                           experts, MOE_MAX_EXPERTS);
    if (n_slots < experts || n_slots > MOE_MAX_SLOTS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "eplb: %d slots for %d experts (need %d..%d)", n_slots, experts,
                           experts, MOE_MAX_SLOTS);
    if (n_ranks < 1 || n_slots % n_ranks != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "eplb: %d slots cannot be split evenly over %d ranks", n_slots, n_ranks);
    if (ranks_per_node > 0 && ranks_per_node < n_ranks && n_ranks % ranks_per_node != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "eplb: %d ranks cannot be split into nodes of %d ranks", n_ranks,
                           ranks_per_node);
    for (int e = 0; e < experts; e++)
        if (!isfinite(expert_load[e]) || expert_load[e] < 0.0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                               "eplb: load of expert %d is %g (need a finite value >= 0)", e,
                               expert_load[e]);

    size_t ints = 4 * (size_t)experts + 2 * (size_t)n_ranks + (size_t)n_slots;
    size_t doubles = 2 * (size_t)n_ranks;
    /* replica_t first: it has the strictest alignment of the three. */
    char *block = malloc((size_t)n_slots * sizeof(replica_t) + doubles * sizeof(double) +
                         ints * sizeof(int));
    if (block == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "eplb: out of memory");
    scratch_t scratch;
    scratch.replica = (replica_t *)(void *)block;
    scratch.rank_load = (double *)(void *)(scratch.replica + n_slots);
    scratch.node_load = scratch.rank_load + n_ranks;
    scratch.replicas = (int *)(void *)(scratch.node_load + n_ranks);
    scratch.group_experts = scratch.replicas + experts;
    scratch.expert_order = scratch.group_experts + experts;
    scratch.node_of = scratch.expert_order + experts;
    scratch.rank_fill = scratch.node_of + experts;
    scratch.node_count = scratch.rank_fill + n_ranks;
    scratch.other = scratch.node_count + n_ranks;

    int n_nodes = ranks_per_node > 0 && ranks_per_node < n_ranks ? n_ranks / ranks_per_node : 1;
    /* Both replication rules (one copy per rank first, or the hottest per
     * copy regardless), keeping the lower predicted imbalance; ties keep
     * one-per-rank. Each rule alone loses on some loads. */
    for (int rule = 0; rule < 2; rule++) {
        int *out = rule == 0 ? slot_expert : scratch.other;
        scratch.spread_first = rule == 0;
        if (n_nodes > 1 && experts >= n_nodes) {
            place_hierarchical(expert_load, experts, n_slots, n_nodes, ranks_per_node, out, &scratch);
        } else {
            for (int e = 0; e < experts; e++) scratch.group_experts[e] = e;
            place_group(expert_load, scratch.group_experts, experts, n_ranks, n_slots / n_ranks, out, &scratch);
        }
    }
    if (moe_eplb_imbalance(expert_load, experts, scratch.other, n_slots, n_ranks, NULL) <
        moe_eplb_imbalance(expert_load, experts, slot_expert, n_slots, n_ranks, NULL))
        memcpy(slot_expert, scratch.other, sizeof(int) * (size_t)n_slots);
    free(block);
    /* Reported from the finished table through the same function callers use
     * to judge it, so the two figures can never disagree. */
    if (rank_load != NULL)
        moe_eplb_imbalance(expert_load, experts, slot_expert, n_slots, n_ranks, rank_load);
    return MOE_OK;
}

double moe_eplb_imbalance(const double *expert_load, int experts, const int *slot_expert,
                          int n_slots, int n_ranks, double *rank_load) {
    if (expert_load == NULL || slot_expert == NULL || experts < 1 || experts > MOE_MAX_EXPERTS ||
        n_ranks < 1 || n_slots < 1 || n_slots % n_ranks != 0)
        return NAN;
    /* per expert: replicas, and ranks holding at least one (a rank's slots
     * are contiguous: last_rank[e] tells whether e was seen on this rank) */
    int replicas[MOE_MAX_EXPERTS] = {0}, holders[MOE_MAX_EXPERTS] = {0}, last_rank[MOE_MAX_EXPERTS];
    const int slots_per_rank = n_slots / n_ranks;
    for (int e = 0; e < experts; e++) last_rank[e] = -1;
    for (int s = 0; s < n_slots; s++) {
        const int e = slot_expert[s];
        if (e < 0 || e >= experts) return NAN;
        replicas[e]++;
        if (last_rank[e] != s / slots_per_rank) holders[e]++, last_rank[e] = s / slots_per_rank;
    }
    /* Routing's pick (moe_slots_pick), with tokens coming evenly from every
     * rank: a rank holding e keeps its own 1/R of e's tokens (in its first
     * replica of e), and the tokens of the ranks that hold none spread over
     * all replicas. With an expert's replicas on distinct ranks this is the
     * even split, load / replicas. */
    for (int e = 0; e < experts; e++) last_rank[e] = -1;
    double total = 0.0, max = 0.0;
    for (int r = 0; r < n_ranks; r++) {
        double sum = 0.0;
        for (int s = r * slots_per_rank; s < (r + 1) * slots_per_rank; s++) {
            const int e = slot_expert[s];
            const bool first_here = last_rank[e] != r;
            last_rank[e] = r;
            if (holders[e] == replicas[e]) { /* copies on distinct ranks: the even split, exactly */
                sum += expert_load[e] / replicas[e];
                continue;
            }
            const double foreign = (double)(n_ranks - holders[e]) / n_ranks / replicas[e];
            sum += expert_load[e] * ((first_here ? 1.0 / n_ranks : 0.0) + foreign);
        }
        if (rank_load != NULL) rank_load[r] = sum;
        total += sum;
        if (sum > max) max = sum;
    }
    return total > 0.0 ? max / (total / n_ranks) : 1.0;
}

bool moe_eplb_should_adopt(double current_imbalance, double new_imbalance,
                           double min_improvement) {
    return new_imbalance <= current_imbalance * (1.0 - min_improvement);
}

/* ---- static placement files ---- */

/* Reads the whole file, refusing non-regular files and anything larger than
 * MOE_EPLB_MAX_FILE_BYTES before allocating. *text is NUL-terminated. */
static moe_err_t read_text(const char *path, char **text, size_t *len, char *msg,
                           size_t msg_size) {
    FILE *file = fopen(path, "rb");
    if (file == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    moe_err_t ret = MOE_OK;
    if (fstat(fileno(file), &st) != 0 || !S_ISREG(st.st_mode) ||
        st.st_size > (off_t)MOE_EPLB_MAX_FILE_BYTES) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: not a regular file of at most %u bytes",
                          path, MOE_EPLB_MAX_FILE_BYTES);
        goto done;
    }
    *text = malloc((size_t)st.st_size + 1);
    if (*text == NULL) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    *len = fread(*text, 1, (size_t)st.st_size, file);
    if (ferror(file)) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: read failed", path);
        free(*text);
        *text = NULL;
        goto done;
    }
    (*text)[*len] = '\0';
done:
    fclose(file);
    return ret;
}

/* Checks one slot -> expert list and copies it to out[n_slots]. `where` names
 * it in messages ("placement" or "placement[2]"). */
static moe_err_t parse_list(const cJSON *list, const char *path, const char *where, int experts,
                            int n_slots, int *out, char *msg, size_t msg_size) {
    if (!cJSON_IsArray(list))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: %s: expected a list of expert ids",
                           path, where);
    int length = cJSON_GetArraySize(list);
    if (length != n_slots)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: %s: %d entries for %d slots", path,
                           where, length, n_slots);
    int seen[MOE_MAX_EXPERTS] = {0};
    int s = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        double value = cJSON_IsNumber(item) ? item->valuedouble : NAN;
        /* Range check on the double first: casting an out-of-range double to
         * int is undefined behaviour. */
        if (!cJSON_IsNumber(item) || value != floor(value))
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                               "%s: %s[%d]: expected an integer expert id", path, where, s);
        if (!(value >= 0.0 && value < (double)experts))
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                               "%s: %s[%d]: expert %.0f out of range [0, %d)", path, where, s,
                               value, experts);
        out[s] = (int)value;
        seen[out[s]] = 1;
        s++;
    }
    for (int e = 0; e < experts; e++)
        if (!seen[e])
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: %s: expert %d has no slot",
                               path, where, e);
    return MOE_OK;
}

/* Per-layer form: finds the list of each daemon layer and parses it. */
static moe_err_t parse_layers(const cJSON *root, const cJSON *placement, const char *path,
                              int experts, int n_slots, int n_layers, const int *layer_ids,
                              int *slot_expert, char *msg, size_t msg_size) {
    int n_lists = cJSON_GetArraySize(placement);
    if (n_lists != n_layers)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: placement: %d per-layer lists for %d layers", path, n_lists,
                           n_layers);
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(root, "layers");
    if (layers != NULL && (!cJSON_IsArray(layers) || cJSON_GetArraySize(layers) != n_lists))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: layers: expected a list of %d layer ids, one per placement list",
                           path, n_lists);
    for (int i = 0; i < n_layers; i++) {
        int id = layer_ids != NULL ? layer_ids[i] : i, index = layers == NULL ? i : -1;
        for (int j = 0; layers != NULL && j < n_lists; j++) {
            const cJSON *layer = cJSON_GetArrayItem(layers, j);
            if (!cJSON_IsNumber(layer) || layer->valuedouble != (double)id) continue;
            if (index >= 0)
                return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                                   "%s: layers[%d]: layer %d listed twice", path, j, id);
            index = j;
        }
        if (index < 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: layers: no placement for layer %d",
                               path, id);
        char where[32];
        snprintf(where, sizeof where, "placement[%d]", index);
        MOE_CHECK(parse_list(cJSON_GetArrayItem(placement, index), path, where, experts, n_slots,
                             slot_expert + (size_t)i * (size_t)n_slots, msg, msg_size));
    }
    return MOE_OK;
}

moe_err_t moe_eplb_load_placement_file(const char *path, int experts, int n_slots, int n_layers,
                                       const int *layer_ids, int *slot_expert, char *msg,
                                       size_t msg_size) {
    if (path == NULL || slot_expert == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "eplb: path and slot_expert are required");
    if (experts < 1 || experts > MOE_MAX_EXPERTS || n_slots < experts || n_slots > MOE_MAX_SLOTS ||
        n_layers < 1 || n_layers > MOE_MAX_LAYERS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "%s: %d experts, %d slots, %d layers out of range", path, experts,
                           n_slots, n_layers);
    char *text = NULL;
    size_t len = 0;
    MOE_CHECK(read_text(path, &text, &len, msg, msg_size));
    moe_err_t ret = MOE_OK;
    cJSON *root = cJSON_ParseWithLength(text, len);
    const cJSON *placement = cJSON_GetObjectItemCaseSensitive(root, "placement");
    if (root == NULL) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: not valid JSON", path);
    } else if (!cJSON_IsArray(placement) || cJSON_GetArraySize(placement) == 0) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                          "%s: expected an object with a non-empty \"placement\" list", path);
    } else if (cJSON_IsArray(cJSON_GetArrayItem(placement, 0))) {
        ret = parse_layers(root, placement, path, experts, n_slots, n_layers, layer_ids,
                           slot_expert, msg, msg_size);
    } else {
        ret = parse_list(placement, path, "placement", experts, n_slots, slot_expert, msg, msg_size);
        for (int i = 1; ret == MOE_OK && i < n_layers; i++)
            memcpy(slot_expert + (size_t)i * (size_t)n_slots, slot_expert,
                   sizeof(int) * (size_t)n_slots);
    }
    cJSON_Delete(root);
    free(text);
    return ret;
}
