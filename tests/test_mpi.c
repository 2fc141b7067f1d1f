/* Runs the multi-rank programs (tests/mpi_*.c) under a real `mpirun -np 2`.
 * mpirun is told it may run as root and oversubscribe, as CI runs as root on
 * a 2-core machine. BXFI_MAP (Criterion's sandbox) is not passed on: a
 * child that saw it would take itself for a Criterion worker. */
#include <criterion/criterion.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int run_mpi(const char *program, int ranks) {
    char self[PATH_MAX] = "", cmd[2 * PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert(len > 0, "cannot locate the test binary");
    self[len] = '\0';
    snprintf(cmd, sizeof cmd,
             "env -u BXFI_MAP timeout 240 mpirun --allow-run-as-root --oversubscribe --bind-to none -np %d "
             "-x OMP_NUM_THREADS=1 -x ASAN_OPTIONS=detect_leaks=0 %s/%s 2>&1",
             ranks, dirname(self), program);
    fflush(stdout);
    int status = system(cmd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Test(mpi, layer_on_two_ranks_matches_dense_reference, .timeout = 300) {
    cr_assert_eq(run_mpi("mpi_layer", 2), 0, "mpi_layer failed under mpirun -np 2 (see output above)");
}

Test(mpi, bench_rebalance_on_two_ranks, .timeout = 300) {
    cr_assert_eq(run_mpi("mpi_bench_eplb", 2), 0, "mpi_bench_eplb failed under mpirun -np 2 (see output above)");
}
