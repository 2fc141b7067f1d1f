/* moe_eplb: the EPLB placement algorithm (DESIGN §6) — which expert each
 * physical slot should hold, computed from per-expert loads; the predicted
 * imbalance of a placement; the adoption rule; static placement files.
 *
 * Pure and deterministic: no globals, no clock, no randomness, ties broken by
 * the lower index. Every rank runs it on the same all-reduced counts and gets
 * the same placement bit for bit, so nothing has to be broadcast. The result
 * is a slot -> expert list in the layout of moe_slots.h (slot s lives on rank
 * s / (n_slots / n_ranks)); turn it into a table with
 * moe_slots_from_placement(). Called by the balancer (online mode) and the
 * config loader (static mode). */
#ifndef MOE_EPLB_H
#define MOE_EPLB_H

#include <stdbool.h>
#include <stddef.h>

#include "../config/moe_config.h"

/* Largest placement file read (bytes): 256 layers x 4096 slots of 4-digit
 * ids fit with room; anything larger is refused before allocating. */
#define MOE_EPLB_MAX_FILE_BYTES (32u << 20)

#ifdef __cplusplus
extern "C" {
#endif

/* Computes a placement: n_slots slots (divisible by n_ranks, >= experts) over
 * n_ranks ranks from per-expert loads (double, >= 0). Deterministic: the same
 * inputs give the same placement on every rank (ties broken by lower index).
 *   1. replicate: every expert one slot; each remaining slot to the expert with
 *      the largest load per replica (ties: fewer replicas, then lower expert
 *      id — so all-zero loads spread the extra slots round-robin). Done by two
 *      rules, and the placement with the lower predicted imbalance is kept
 *      (ties: the first): (a) only experts with fewer replicas than the group
 *      has ranks compete while any does (routing sends a token to a copy on
 *      its own rank first, so a second copy on a rank serves only the tokens
 *      of ranks holding none); (b) every expert competes;
 *   2. pack: sort the replicas by load per replica, descending (ties: lower
 *      expert id), put each on the rank with the least load that still has a
 *      free slot (ties: fewer filled slots, then lower rank); a rank never
 *      holds two replicas of the same expert when avoidable (if the
 *      least-loaded rank with room already has that expert, take the next
 *      least-loaded one with room that does not);
 *   3. hierarchical (ranks_per_node > 0, n_ranks divisible by it, n_nodes > 1):
 *      first pack whole experts onto nodes by the same greedy rule (balance
 *      node loads, ties: fewer experts, then lower node; at most
 *      n_slots / n_nodes experts per node), then 1-2 inside each node with
 *      that node's n_slots / n_nodes slots, so an expert's replicas all stay
 *      on its node. ranks_per_node <= 0 or >= n_ranks means one node (flat);
 *      fewer experts than nodes also falls back to flat, as no node may be
 *      left without an expert for its slots.
 * Within a rank, slots are ordered by expert id ascending.
 * Writes slot_expert[n_slots]; predicted rank loads (as moe_eplb_imbalance
 * computes them) into rank_load[n_ranks] if not NULL.
 * Returns MOE_OK, MOE_ERR_INVAL (bad argument, explained in msg) or
 * MOE_ERR_NOMEM. On error slot_expert and rank_load are unspecified. */
moe_err_t moe_eplb_place(const double *expert_load, int experts, int n_slots, int n_ranks,
                         int ranks_per_node, int *slot_expert, double *rank_load, char *msg,
                         size_t msg_size);

/* Predicted per-rank loads of an existing placement under expert loads, as
 * routing's pick (moe_slots_pick) spreads them when tokens come evenly from
 * every rank: a rank holding expert e takes its own 1/n_ranks of e's load,
 * and the share of the ranks holding no replica of e is split over all of
 * e's replicas. With an expert's replicas on distinct ranks this is its load
 * split evenly over them; a second replica on one rank adds only foreign
 * tokens. An expert without a slot adds nothing. Written to
 * rank_load[n_ranks] when not NULL. Returns the imbalance max / mean rank
 * load, 1.0 when all loads are 0, NAN when the
 * arguments are invalid (n_ranks < 1, n_slots not divisible by n_ranks, an
 * expert id out of [0, experts)). */
double moe_eplb_imbalance(const double *expert_load, int experts, const int *slot_expert,
                          int n_slots, int n_ranks, double *rank_load /* may be NULL */);

/* True when a new placement should be adopted: its predicted imbalance is at
 * least min_improvement (a fraction, e.g. 0.05) lower, relatively, than the
 * current one: new <= current * (1 - min_improvement). False when either
 * figure is NAN. */
bool moe_eplb_should_adopt(double current_imbalance, double new_imbalance,
                           double min_improvement);

/* Reads a static placement from a JSON file, either
 *   {"placement": [e0, e1, ...]}                  the same list for every layer, or
 *   {"placement": [[...], [...]], "layers": [L0, L1]}  one list per model layer id
 *                                                  ("layers" optional: then the lists
 *                                                  are taken in order, one per layer).
 * layer_ids[n_layers] are the model layer ids the daemon holds (NULL: 0..n_layers-1);
 * with per-layer lists each must appear in "layers" exactly once, and the
 * number of lists must equal n_layers. Each list: n_slots integer ids in
 * [0, experts), every expert at least once. Writes slot_expert[n_layers * n_slots]
 * (row i for layer_ids[i]). Returns MOE_OK, MOE_ERR_INVAL (bad argument),
 * MOE_ERR_IO (cannot open/read), MOE_ERR_FORMAT (bad contents; msg names the
 * file and the index) or MOE_ERR_NOMEM. */
moe_err_t moe_eplb_load_placement_file(const char *path, int experts, int n_slots, int n_layers,
                                       const int *layer_ids,
                                       int *slot_expert /* [n_layers * n_slots] */, char *msg,
                                       size_t msg_size);

#ifdef __cplusplus
}
#endif

#endif
