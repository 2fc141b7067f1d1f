/* moe_mpi_boot: how a moed process joins its job. Under mpirun (OpenMPI sets
 * OMPI_COMM_WORLD_SIZE) it initialises MPI and returns MPI_COMM_WORLD; a
 * process started alone is a valid 1-rank job and makes no MPI call at all.
 * Used by moed and moe-bench. */
#ifndef MOE_MPI_BOOT_H
#define MOE_MPI_BOOT_H

#include "../config/moe_err.h"
#include "../kernels/moe_ep.h"

/* Initialises MPI when under a launcher (with thread support for the daemon's
 * I/O thread) and fills ep. */
moe_err_t moe_mpi_boot(int *argc, char ***argv, moe_ep_t *ep, char *msg, size_t msg_size);

/* Finalises MPI if moe_mpi_boot initialised it. */
void moe_mpi_shutdown(void);

/* Ends the whole job after a fatal error on one rank, so that no other rank
 * hangs in a collective (MPI_Abort under mpirun). Returns only in a 1-rank
 * job. */
void moe_mpi_abort_job(int code);

#endif
