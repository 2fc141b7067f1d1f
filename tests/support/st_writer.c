/* st_writer: see st_writer.h. The header is built with cJSON and written
 * without padding, so the data section is usually misaligned — which is
 * exactly what the reader must cope with. */
#include "st_writer.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *name;
    char dtype[16];
    int n_dims;
    int64_t shape[8];
    uint8_t *data;
    size_t n_bytes;
} st_entry_t;

struct moe_test_st {
    int count;
    st_entry_t *entries;
};

moe_test_st_t *moe_test_st_new(void) { return calloc(1, sizeof(moe_test_st_t)); }

void moe_test_st_free(moe_test_st_t *st) {
    if (st == NULL) return;
    for (int i = 0; i < st->count; i++) {
        free(st->entries[i].name);
        free(st->entries[i].data);
    }
    free(st->entries);
    free(st);
}

int moe_test_st_add_raw(moe_test_st_t *st, const char *name, const char *dtype, int n_dims,
                        const int64_t *shape, const void *data, size_t n_bytes) {
    if (n_dims < 0 || n_dims > 8 || strlen(dtype) >= 16) return -1;
    st_entry_t *grown = realloc(st->entries, (size_t)(st->count + 1) * sizeof *grown);
    if (grown == NULL) return -1;
    st->entries = grown;
    st_entry_t *e = &st->entries[st->count];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    e->data = malloc(n_bytes ? n_bytes : 1);
    if (e->name == NULL || e->data == NULL) {
        free(e->name);
        free(e->data);
        return -1;
    }
    snprintf(e->dtype, sizeof e->dtype, "%s", dtype);
    e->n_dims = n_dims;
    for (int d = 0; d < n_dims; d++) e->shape[d] = shape[d];
    if (n_bytes) memcpy(e->data, data, n_bytes);
    e->n_bytes = n_bytes;
    st->count++;
    return 0;
}

uint16_t moe_test_f32_to_f16(float value) {
    uint32_t x;
    memcpy(&x, &value, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t abs_bits = x & 0x7fffffffu;
    if (abs_bits >= 0x7f800000u) return sign | (abs_bits > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (abs_bits >= 0x477ff000u) return sign | 0x7c00u; /* rounds to >= 65536: inf */
    if (abs_bits < 0x38800000u) {
        /* Below 2^-14: a subnormal half is an integer multiple of 2^-24;
         * scaling by 2^24 is exact and nearbyintf rounds half to even. */
        float magnitude;
        memcpy(&magnitude, &abs_bits, 4);
        return sign | (uint16_t)nearbyintf(magnitude * 16777216.0f);
    }
    uint32_t h = ((abs_bits >> 23) - 112u) << 10 | ((abs_bits & 0x7fffffu) >> 13);
    uint32_t rest = abs_bits & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

uint16_t moe_test_f32_to_bf16(float value) {
    uint32_t x;
    memcpy(&x, &value, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

int moe_test_st_add_f32(moe_test_st_t *st, const char *name, const char *dtype, int n_dims,
                        const int64_t *shape, const float *values) {
    size_t n = 1;
    for (int d = 0; d < n_dims; d++) n *= (size_t)shape[d];
    if (strcmp(dtype, "F32") == 0)
        return moe_test_st_add_raw(st, name, dtype, n_dims, shape, values, n * 4);
    uint16_t *half = malloc(n ? n * 2 : 1);
    if (half == NULL) return -1;
    int is_bf16 = strcmp(dtype, "BF16") == 0;
    if (!is_bf16 && strcmp(dtype, "F16") != 0) {
        free(half);
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        half[i] = is_bf16 ? moe_test_f32_to_bf16(values[i]) : moe_test_f32_to_f16(values[i]);
    int ret = moe_test_st_add_raw(st, name, dtype, n_dims, shape, half, n * 2);
    free(half);
    return ret;
}

int moe_test_write_bytes(const char *path, const void *data, size_t n_bytes) {
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    int ok = n_bytes == 0 || fwrite(data, 1, n_bytes, f) == n_bytes;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

int moe_test_st_write_raw(const char *path, const char *header, const void *data,
                          size_t n_bytes) {
    size_t header_len = strlen(header);
    size_t total = 8 + header_len + n_bytes;
    uint8_t *buf = malloc(total);
    if (buf == NULL) return -1;
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    memcpy(buf + 8, header, header_len);
    if (n_bytes) memcpy(buf + 8 + header_len, data, n_bytes);
    int ret = moe_test_write_bytes(path, buf, total);
    free(buf);
    return ret;
}

int moe_test_st_save(const moe_test_st_t *st, const char *path) {
    cJSON *root = cJSON_CreateObject();
    size_t offset = 0;
    int ret = -1;
    char *header = NULL;
    uint8_t *data = NULL;
    if (root == NULL) return -1;
    for (int i = 0; i < st->count; i++) {
        const st_entry_t *e = &st->entries[i];
        cJSON *entry = cJSON_AddObjectToObject(root, e->name);
        cJSON *shape = entry ? cJSON_AddArrayToObject(entry, "shape") : NULL;
        cJSON *offsets = entry ? cJSON_AddArrayToObject(entry, "data_offsets") : NULL;
        if (offsets == NULL || cJSON_AddStringToObject(entry, "dtype", e->dtype) == NULL)
            goto done;
        for (int d = 0; d < e->n_dims; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)e->shape[d]));
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)offset));
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)(offset + e->n_bytes)));
        offset += e->n_bytes;
    }
    header = cJSON_PrintUnformatted(root);
    data = malloc(offset ? offset : 1);
    if (header == NULL || data == NULL) goto done;
    offset = 0;
    for (int i = 0; i < st->count; i++) {
        memcpy(data + offset, st->entries[i].data, st->entries[i].n_bytes);
        offset += st->entries[i].n_bytes;
    }
    ret = moe_test_st_write_raw(path, header, data, offset);
done:
    free(data);
    free(header);
    cJSON_Delete(root);
    return ret;
}

int moe_test_mkdtemp(char *buf, size_t size) {
    const char *tmp = getenv("TMPDIR");
    int n = snprintf(buf, size, "%s/moe-test-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (n < 0 || (size_t)n >= size) return -1;
    return mkdtemp(buf) ? 0 : -1;
}

void moe_test_rmdir(const char *dir) {
    DIR *d = opendir(dir);
    if (d != NULL) {
        struct dirent *ent;
        char path[4096];
        while ((ent = readdir(d)) != NULL) {
            if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
            snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}
