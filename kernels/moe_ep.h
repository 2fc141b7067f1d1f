/* moe_ep: the expert-parallel group a backend runs in. The CPU backend talks
 * over `comm` with MPI; a 1-rank group makes no MPI call at all, so a single
 * process (or a unit test) needs no MPI_Init. */
#ifndef MOE_EP_H
#define MOE_EP_H

#include <mpi.h>

typedef struct {
    int rank;
    int size;
    MPI_Comm comm; /* ignored when size == 1 */
} moe_ep_t;

/* The 1-rank group of a process that is not under MPI. */
static inline moe_ep_t moe_ep_single(void) {
    moe_ep_t ep = {0, 1, MPI_COMM_NULL};
    return ep;
}

#endif
