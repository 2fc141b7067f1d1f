/* moe_slots: the slot table of EPLB (DESIGN §6) — which expert each physical
 * slot holds, and for each expert the slots holding it. Slot s lives on rank
 * s / slots_per_rank. Built from the config (off: slot = expert; static: the
 * configured placement or the default one) by every rank identically. Used
 * by both backends and the EPLB placement code. */
#ifndef MOE_SLOTS_H
#define MOE_SLOTS_H

#include <stddef.h>

#include "../config/moe_config.h"

typedef struct {
    int n_experts;
    int n_slots;
    int n_ranks;
    int slots_per_rank;
    int slot_expert[MOE_MAX_SLOTS];    /* slot -> expert */
    int replica_start[MOE_MAX_EXPERTS + 1]; /* expert e's slots: replica_slot[start[e]..start[e+1]) */
    int replica_slot[MOE_MAX_SLOTS];   /* ascending within an expert */
} moe_slot_table_t;

/* Builds the table for `experts` experts over n_ranks ranks from eplb:
 *   off:    num_slots must be 0 or experts; slot = expert.
 *   static/online: num_slots (0 = experts) slots; eplb.placement when given,
 *           else the default: slot s < E holds expert s, and the extra slot
 *           E + j holds expert j (replicas of the lowest ids).
 * Errors (slots not divisible by ranks, bad placement) name the field. */
#ifdef __cplusplus
extern "C" {
#endif
moe_err_t moe_slots_build(const moe_eplb_config_t *eplb, int experts, int n_ranks,
                          moe_slot_table_t *table, char *msg, size_t msg_size);

/* Builds from an explicit slot -> expert list (n_slots entries). */
moe_err_t moe_slots_from_placement(const int *slot_expert, int n_slots, int experts,
                                   int n_ranks, moe_slot_table_t *table, char *msg,
                                   size_t msg_size);

#ifdef __cplusplus
}
#endif

/* The slot that serves `expert` for a token of rank token_rank with index
 * token_index: a replica on the token's own rank if there is one, else the
 * replicas in turn by token index (DESIGN §4 step 2). */
#ifdef __CUDACC__
#define MOE_SLOTS_HD __host__ __device__ __forceinline__
#else
#define MOE_SLOTS_HD static inline
#endif
MOE_SLOTS_HD int moe_slots_pick(const moe_slot_table_t *table, int expert, int token_rank,
                                long long token_index) {
    int start = table->replica_start[expert], count = table->replica_start[expert + 1] - start;
    if (count == 1) return table->replica_slot[start];
    for (int i = 0; i < count; i++) {
        int slot = table->replica_slot[start + i];
        if (slot / table->slots_per_rank == token_rank) return slot;
    }
    return table->replica_slot[start + (int)(token_index % count)];
}

#endif
