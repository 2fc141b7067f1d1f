/* slots: building and checking slot tables (see moe_slots.h). */
#include "moe_slots.h"

#include <string.h>

moe_err_t moe_slots_from_placement(const int *slot_expert, int n_slots, int experts,
                                   int n_ranks, moe_slot_table_t *table, char *msg,
                                   size_t msg_size) {
    if (experts < 1 || experts > MOE_MAX_EXPERTS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "model.experts %d out of range", experts);
    if (n_slots < experts || n_slots > MOE_MAX_SLOTS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "eplb.num_slots: %d slots for %d experts (need %d..%d)", n_slots,
                           experts, experts, MOE_MAX_SLOTS);
    if (n_ranks < 1 || n_slots % n_ranks != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "eplb.num_slots: %d slots cannot be split evenly over %d ranks",
                           n_slots, n_ranks);
    memset(table, 0, sizeof *table);
    table->n_experts = experts;
    table->n_slots = n_slots;
    table->n_ranks = n_ranks;
    table->slots_per_rank = n_slots / n_ranks;
    int count[MOE_MAX_EXPERTS] = {0};
    for (int s = 0; s < n_slots; s++) {
        int e = slot_expert[s];
        if (e < 0 || e >= experts)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "eplb.placement[%d]: expert %d out of range [0, %d)", s, e, experts);
        table->slot_expert[s] = e;
        count[e]++;
    }
    for (int e = 0; e < experts; e++) {
        if (count[e] == 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "eplb.placement: expert %d has no slot", e);
        table->replica_start[e + 1] = table->replica_start[e] + count[e];
    }
    int fill[MOE_MAX_EXPERTS];
    memcpy(fill, table->replica_start, sizeof(int) * (size_t)experts);
    for (int s = 0; s < n_slots; s++) table->replica_slot[fill[slot_expert[s]]++] = s;
    return MOE_OK;
}

moe_err_t moe_slots_build(const moe_eplb_config_t *eplb, int experts, int n_ranks,
                          moe_slot_table_t *table, char *msg, size_t msg_size) {
    int n_slots = eplb->num_slots > 0 ? eplb->num_slots : experts;
    if (eplb->mode == MOE_EPLB_OFF && n_slots != experts)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "eplb.num_slots: %d redundant slots need eplb.mode static or online",
                           n_slots - experts);
    if (n_slots > MOE_MAX_SLOTS || n_slots < experts)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "eplb.num_slots: %d out of range [%d, %d]", n_slots, experts,
                           MOE_MAX_SLOTS);
    static _Thread_local int placement[MOE_MAX_SLOTS];
    if (eplb->mode != MOE_EPLB_OFF && eplb->n_placement > 0) {
        if (eplb->n_placement != n_slots)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "eplb.placement: %d entries for %d slots", eplb->n_placement,
                               n_slots);
        memcpy(placement, eplb->placement, sizeof(int) * (size_t)n_slots);
    } else {
        for (int s = 0; s < n_slots; s++) placement[s] = s < experts ? s : (s - experts) % experts;
    }
    return moe_slots_from_placement(placement, n_slots, experts, n_ranks, table, msg, msg_size);
}
