/* moectl_npy: just enough of the .npy format (numpy's NEP 1) for moectl's
 * --input/--output: a 2-D, C-order, little-endian float32 or float16 array.
 * Reading checks every length against the file size before allocating. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_frame.h"
#include "moectl.h"

static int fail(char *msg, size_t n, const char *path, const char *why) {
    snprintf(msg, n, "%s: %s", path, why);
    return -1;
}

/* Value of 'key' in the header dict, as the text right after "'key':". */
static const char *dict_value(const char *header, const char *key) {
    char pattern[32];
    snprintf(pattern, sizeof pattern, "'%s':", key);
    const char *p = strstr(header, pattern);
    if (p == NULL) return NULL;
    p += strlen(pattern);
    while (*p == ' ') p++;
    return p;
}

int moectl_npy_read(const char *path, float **data, uint32_t *rows, uint32_t *cols, char *msg,
                    size_t n) {
    *data = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return fail(msg, n, path, strerror(errno));
    int ret = -1;
    char *header = NULL;
    void *raw = NULL;
    uint8_t pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        fail(msg, n, path, "not a .npy file");
        goto out;
    }
    size_t header_len = pre[8] | (size_t)pre[9] << 8;
    if (pre[6] >= 2) { /* v2/v3: a 4-byte header length */
        if (fread(pre + 10, 1, 2, f) != 2) {
            fail(msg, n, path, "truncated header");
            goto out;
        }
        header_len |= (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    }
    if (header_len > 1 << 20) {
        fail(msg, n, path, "header too long");
        goto out;
    }
    header = malloc(header_len + 1);
    if (header == NULL || fread(header, 1, header_len, f) != header_len) {
        fail(msg, n, path, "truncated header");
        goto out;
    }
    header[header_len] = '\0';
    const char *descr = dict_value(header, "descr"), *order = dict_value(header, "fortran_order"),
               *shape = dict_value(header, "shape");
    if (!descr || !order || !shape) {
        fail(msg, n, path, "header lacks descr, fortran_order or shape");
        goto out;
    }
    uint8_t dtype;
    if (strncmp(descr, "'<f4'", 5) == 0) dtype = MOE_DTYPE_F32;
    else if (strncmp(descr, "'<f2'", 5) == 0) dtype = MOE_DTYPE_F16;
    else {
        fail(msg, n, path, "dtype must be little-endian float32 or float16");
        goto out;
    }
    if (strncmp(order, "False", 5) != 0) {
        fail(msg, n, path, "array must be C-order (np.ascontiguousarray)");
        goto out;
    }
    unsigned long long dims[2] = {0, 0};
    int n_dims = 0;
    const char *p = shape + 1;
    while (n_dims < 3) {
        while (*p == ' ') p++;
        if (*p == ')') break;
        char *end;
        unsigned long long d = strtoull(p, &end, 10);
        if (end == p) break;
        if (n_dims < 2) dims[n_dims] = d;
        n_dims++;
        p = end;
        while (*p == ' ' || *p == ',') p++;
    }
    if (n_dims == 1) dims[1] = dims[0], dims[0] = 1; /* a single token */
    if (n_dims < 1 || n_dims > 2 || dims[0] == 0 || dims[1] == 0 || dims[0] > UINT32_MAX ||
        dims[1] > UINT32_MAX) {
        fail(msg, n, path, "shape must be [tokens, hidden]");
        goto out;
    }
    size_t values = (size_t)dims[0] * dims[1], bytes = values * moe_dtype_size(dtype);
    long here = ftell(f);
    if (fseek(f, 0, SEEK_END) != 0 || ftell(f) - here < (long)bytes || fseek(f, here, SEEK_SET)) {
        fail(msg, n, path, "file shorter than its shape");
        goto out;
    }
    raw = malloc(bytes);
    *data = malloc(values * sizeof(float));
    if (raw == NULL || *data == NULL || fread(raw, 1, bytes, f) != bytes) {
        fail(msg, n, path, "cannot read the data");
        free(*data);
        *data = NULL;
        goto out;
    }
    moe_dtype_to_f32(dtype, raw, *data, values);
    *rows = (uint32_t)dims[0];
    *cols = (uint32_t)dims[1];
    ret = 0;
out:
    free(raw);
    free(header);
    fclose(f);
    return ret;
}

int moectl_npy_write(const char *path, const float *data, uint32_t rows, uint32_t cols, char *msg,
                     size_t n) {
    char dict[128];
    int len = snprintf(dict, sizeof dict,
                       "{'descr': '<f4', 'fortran_order': False, 'shape': (%u, %u), }", rows, cols);
    /* v1.0: magic + 2-byte length, header padded with spaces to a multiple
     * of 64 and ended by '\n' so the data is aligned */
    size_t total = 10 + (size_t)len + 1;
    size_t pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (f == NULL) return fail(msg, n, path, strerror(errno));
    uint16_t hlen = (uint16_t)(len + pad + 1);
    uint8_t pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (uint8_t)hlen, (uint8_t)(hlen >> 8)};
    fwrite(pre, 1, 10, f);
    fwrite(dict, 1, (size_t)len, f);
    for (size_t i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    size_t values = (size_t)rows * cols;
    uint8_t *le = malloc(values * 4 + 1);
    if (le == NULL) {
        fclose(f);
        return fail(msg, n, path, "out of memory");
    }
    moe_dtype_from_f32(MOE_DTYPE_F32, data, le, values);
    size_t wrote = fwrite(le, 4, values, f);
    free(le);
    if (fclose(f) != 0 || wrote != values) return fail(msg, n, path, "write failed");
    return 0;
}
