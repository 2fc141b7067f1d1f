/* mpi_boot: see moe_mpi_boot.h. */
#include <stdlib.h>
#include <unistd.h>

#include "moe_mpi_boot.h"

static int mpi_started;
static int thread_level;

moe_err_t moe_mpi_boot(int *argc, char ***argv, moe_ep_t *ep, char *msg, size_t msg_size) {
    *ep = moe_ep_single();
    if (getenv("OMPI_COMM_WORLD_SIZE") == NULL && getenv("PMI_SIZE") == NULL &&
        getenv("PMIX_RANK") == NULL)
        return MOE_OK;
    /* The compute thread makes every MPI call but one: MPI_Abort from the
     * watchdog or a signal. That is legal only with MPI_THREAD_MULTIPLE; with
     * less, moe_mpi_abort_job exits the process instead (mpirun then ends
     * the job, as it does for any rank that exits without finalising). */
    if (MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &thread_level) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "MPI_Init_thread failed");
    mpi_started = 1;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    ep->comm = MPI_COMM_WORLD;
    MPI_Comm_rank(MPI_COMM_WORLD, &ep->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ep->size);
    return MOE_OK;
}

void moe_mpi_shutdown(void) {
    if (mpi_started) MPI_Finalize();
    mpi_started = 0;
}

void moe_mpi_abort_job(int code) {
    if (mpi_started && thread_level >= MPI_THREAD_MULTIPLE) MPI_Abort(MPI_COMM_WORLD, code);
    if (mpi_started) _exit(code);
}
