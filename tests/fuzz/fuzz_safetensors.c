/* fuzz_safetensors: libFuzzer harness for the safetensors reader (DESIGN §10,
 * §11). The input is the whole file: it is written to a memfd and opened
 * through /proc/self/fd/N, so moe_st_open runs its real open/fstat/mmap path
 * with no disk I/O. On success every tensor is converted with moe_st_to_f32.
 *
 * Invariants (abort on violation), checked against the mapping itself (found
 * in /proc/self/maps, since the reader does not export its base): every
 * tensor's bytes lie inside the data section [8 + header_len, file size),
 * n_bytes is exactly elements x element size for F32/F16/BF16, an F32
 * conversion reproduces the file's bytes, asking for one element more than
 * the tensor holds is refused with MOE_ERR_RANGE, other dtypes are refused
 * with MOE_ERR_UNSUPPORTED, and lookups by name find each tensor.
 *
 * Built and run by `make fuzz` (not part of `make test`). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../kernels/moe_safetensors.h"

#define FUZZ_MEMFD_NAME "moe_fuzz_st"
#define FUZZ_MAX_TENSOR_BYTES (1u << 20) /* bigger tensors are skipped */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int memfd = -1;
static char memfd_path[64];
static float convert_buf[FUZZ_MAX_TENSOR_BYTES / 2 + 1]; /* F16: 2 bytes -> 1 float */

/* The address range of our memfd's mapping, from /proc/self/maps. */
static int find_mapping(uintptr_t *begin, uintptr_t *end) {
    FILE *maps = fopen("/proc/self/maps", "r");
    if (maps == NULL) return -1;
    char line[512];
    int found = -1;
    while (fgets(line, sizeof line, maps) != NULL) {
        if (strstr(line, "memfd:" FUZZ_MEMFD_NAME) == NULL) continue;
        unsigned long b, e;
        if (sscanf(line, "%lx-%lx", &b, &e) == 2) {
            if (found == 0) { /* two mappings: cannot tell which is the reader's */
                found = -1;
                break;
            }
            *begin = b, *end = e;
            found = 0;
        }
    }
    fclose(maps);
    return found;
}

static size_t elem_size(moe_st_dtype_t dtype) {
    return dtype == MOE_ST_F32 ? 4 : dtype == MOE_ST_F16 || dtype == MOE_ST_BF16 ? 2 : 0;
}

static void check_tensor(const moe_st_file_t *file, const moe_st_tensor_t *t, const uint8_t *data,
                         size_t size, uintptr_t map_begin, int have_map) {
    if (t == NULL || t->name == NULL) abort();
    if (t->n_dims < 0 || t->n_dims > MOE_ST_MAX_DIMS) abort();
    if (moe_st_find(file, t->name) != t) abort();
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | data[i];
    size_t offset = 0; /* of the tensor's bytes in the file */
    if (have_map) {
        uintptr_t p = (uintptr_t)t->data;
        if (p < map_begin + 8 + header_len || p - map_begin > size ||
            t->n_bytes > size - (p - map_begin))
            abort();
        offset = (size_t)(p - map_begin);
    }
    size_t esize = elem_size(t->dtype);
    if (esize == 0) {
        if (moe_st_to_f32(t, convert_buf, 0) != MOE_ERR_UNSUPPORTED) abort();
        return;
    }
    uint64_t n_elems = 1;
    for (int d = 0; d < t->n_dims; d++) {
        if (t->shape[d] < 0) abort();
        if (__builtin_mul_overflow(n_elems, (uint64_t)t->shape[d], &n_elems)) abort();
    }
    uint64_t want_bytes;
    if (__builtin_mul_overflow(n_elems, (uint64_t)esize, &want_bytes) || want_bytes != t->n_bytes)
        abort();
    if (moe_st_to_f32(t, convert_buf, (size_t)n_elems + 1) != MOE_ERR_RANGE) abort();
    if (t->n_bytes > FUZZ_MAX_TENSOR_BYTES) return;
    if (moe_st_to_f32(t, convert_buf, (size_t)n_elems) != MOE_OK) abort();
    if (have_map && t->dtype == MOE_ST_F32 && memcmp(convert_buf, data + offset, t->n_bytes) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (memfd < 0) {
        memfd = memfd_create(FUZZ_MEMFD_NAME, MFD_CLOEXEC);
        if (memfd < 0) {
            perror("memfd_create");
            abort();
        }
        snprintf(memfd_path, sizeof memfd_path, "/proc/self/fd/%d", memfd);
    }
    if (ftruncate(memfd, 0) != 0 || (size > 0 && pwrite(memfd, data, size, 0) != (ssize_t)size)) {
        perror("memfd write");
        abort();
    }
    moe_st_file_t *file = NULL;
    char msg[512];
    msg[0] = '\0';
    moe_err_t ret = moe_st_open(memfd_path, &file, msg, sizeof msg);
    if (ret != MOE_OK) {
        if (file != NULL || msg[0] == '\0' || memchr(msg, '\0', sizeof msg) == NULL) abort();
        return 0;
    }
    if (file == NULL || size < 8) abort();
    uintptr_t map_begin = 0, map_end = 0;
    int have_map = find_mapping(&map_begin, &map_end) == 0;
    if (have_map && map_end - map_begin < size) abort();
    int count = moe_st_count(file);
    if (count < 0) abort();
    for (int i = 0; i < count; i++) check_tensor(file, moe_st_at(file, i), data, size, map_begin, have_map);
    if (moe_st_at(file, count) != NULL || moe_st_at(file, -1) != NULL) abort();
    moe_st_close(file);
    return 0;
}
