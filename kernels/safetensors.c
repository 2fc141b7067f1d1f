/* safetensors: memory-mapped reader for the safetensors format
 * (https://github.com/huggingface/safetensors):
 *
 *     [u64 little-endian N][N bytes of JSON header][data]
 *
 * The header maps tensor name -> {dtype, shape, data_offsets [begin, end)}
 * with offsets relative to the start of the data section; "__metadata__" is
 * a string map we ignore. Nothing is trusted (DESIGN §10): the header length
 * is checked against the file size and MOE_ST_MAX_HEADER before the JSON
 * parser sees it, every number is checked to be a non-negative integer, and
 * every size product is computed with overflow checks before it is compared
 * with the data section. The tensor table is sorted by name so that lookups
 * stay O(log n) on checkpoints with tens of thousands of tensors. */
#include "moe_safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct moe_st_file {
    char *path;
    const uint8_t *map;
    size_t map_size;
    cJSON *header; /* kept alive: tensor names point into it */
    int count;
    moe_st_tensor_t *tensors; /* sorted by name */
};

/* Element sizes of the dtypes the format defines; 0 = unknown to us (then we
 * check only that the offsets stay inside the data section). */
static const struct {
    const char *name;
    moe_st_dtype_t dtype;
    size_t size;
} st_dtypes[] = {
    {"F32", MOE_ST_F32, 4},     {"F16", MOE_ST_F16, 2},       {"BF16", MOE_ST_BF16, 2},
    {"F64", MOE_ST_OTHER, 8},   {"I64", MOE_ST_OTHER, 8},     {"U64", MOE_ST_OTHER, 8},
    {"I32", MOE_ST_OTHER, 4},   {"U32", MOE_ST_OTHER, 4},     {"I16", MOE_ST_OTHER, 2},
    {"U16", MOE_ST_OTHER, 2},   {"I8", MOE_ST_OTHER, 1},      {"U8", MOE_ST_OTHER, 1},
    {"BOOL", MOE_ST_OTHER, 1},  {"F8_E4M3", MOE_ST_OTHER, 1}, {"F8_E5M2", MOE_ST_OTHER, 1},
};

static size_t st_dtype_size(moe_st_dtype_t dtype) {
    switch (dtype) {
    case MOE_ST_F32: return 4;
    case MOE_ST_F16:
    case MOE_ST_BF16: return 2;
    default: return 0;
    }
}

/* A JSON number that is an exact non-negative integer below 2^53 (doubles
 * are exact up to there; larger values cannot describe a real file). */
static bool st_json_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return false;
    double v = item->valuedouble;
    if (!(v >= 0.0) || v > 9007199254740992.0 || floor(v) != v) return false;
    *out = (uint64_t)v;
    return true;
}

static int st_cmp_name(const void *a, const void *b) {
    return strcmp(((const moe_st_tensor_t *)a)->name, ((const moe_st_tensor_t *)b)->name);
}

/* Validates one header entry and fills *t. */
static moe_err_t st_parse_entry(const char *path, const cJSON *entry, size_t data_size,
                                const uint8_t *data, moe_st_tensor_t *t, char *msg,
                                size_t msg_size) {
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: tensor '%s': entry is not an object",
                           path, name);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsString(dtype))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: tensor '%s': missing dtype string",
                           path, name);
    if (!cJSON_IsArray(shape))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: tensor '%s': missing shape array",
                           path, name);
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: tensor '%s': data_offsets must be [begin, end]", path, name);

    memset(t, 0, sizeof *t);
    t->name = name;
    t->dtype = MOE_ST_OTHER;
    size_t elem_size = 0;
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++) {
        if (strcmp(dtype->valuestring, st_dtypes[i].name) == 0) {
            t->dtype = st_dtypes[i].dtype;
            elem_size = st_dtypes[i].size;
            break;
        }
    }

    int n_dims = cJSON_GetArraySize(shape);
    if (n_dims > MOE_ST_MAX_DIMS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: tensor '%s': %d dimensions (at most %d supported)", path, name,
                           n_dims, MOE_ST_MAX_DIMS);
    t->n_dims = n_dims;
    uint64_t n_elems = 1;
    bool elems_overflow = false;
    int d = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape) {
        uint64_t v;
        if (!st_json_uint(dim, &v))
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                               "%s: tensor '%s': shape[%d] is not a non-negative integer", path,
                               name, d);
        t->shape[d++] = (int64_t)v;
        if (__builtin_mul_overflow(n_elems, v, &n_elems)) elems_overflow = true;
    }

    uint64_t begin, end;
    if (!st_json_uint(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !st_json_uint(cJSON_GetArrayItem(offsets, 1), &end))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: tensor '%s': data_offsets are not non-negative integers", path,
                           name);
    if (begin > end || end > data_size)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                           "%s: tensor '%s': data_offsets [%llu,%llu] exceed data size %zu", path,
                           name, (unsigned long long)begin, (unsigned long long)end, data_size);
    if (elem_size > 0) {
        uint64_t want;
        if (elems_overflow || __builtin_mul_overflow(n_elems, (uint64_t)elem_size, &want) ||
            want != end - begin)
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                               "%s: tensor '%s': data_offsets [%llu,%llu] hold %llu bytes but "
                               "shape and dtype %s need %s%llu",
                               path, name, (unsigned long long)begin, (unsigned long long)end,
                               (unsigned long long)(end - begin), dtype->valuestring,
                               elems_overflow ? "more than " : "",
                               elems_overflow ? (unsigned long long)UINT64_MAX
                                              : (unsigned long long)(n_elems * elem_size));
    }
    t->data = data + begin;
    t->n_bytes = (size_t)(end - begin);
    return MOE_OK;
}

/* Parses the header and fills file->tensors. */
static moe_err_t st_parse_header(moe_st_file_t *file, const char *header, size_t header_len,
                                 size_t data_size, const uint8_t *data, char *msg,
                                 size_t msg_size) {
    file->header = cJSON_ParseWithLength(header, header_len);
    if (file->header == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: header is not valid JSON",
                           file->path);
    if (!cJSON_IsObject(file->header))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: header is not a JSON object",
                           file->path);
    int n = cJSON_GetArraySize(file->header);
    file->tensors = calloc(n > 0 ? (size_t)n : 1, sizeof *file->tensors);
    if (file->tensors == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", file->path);
    const cJSON *entry;
    cJSON_ArrayForEach(entry, file->header) {
        if (entry->string == NULL)
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: header entry without a name",
                               file->path);
        if (strcmp(entry->string, "__metadata__") == 0) continue;
        moe_err_t ret = st_parse_entry(file->path, entry, data_size, data,
                                       &file->tensors[file->count], msg, msg_size);
        if (ret != MOE_OK) return ret;
        file->count++;
    }
    qsort(file->tensors, (size_t)file->count, sizeof *file->tensors, st_cmp_name);
    /* cJSON keeps duplicate keys; a lookup would silently pick one of them. */
    for (int i = 1; i < file->count; i++)
        if (strcmp(file->tensors[i - 1].name, file->tensors[i].name) == 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: tensor '%s' appears twice",
                               file->path, file->tensors[i].name);
    return MOE_OK;
}

moe_err_t moe_st_open(const char *path, moe_st_file_t **out, char *msg, size_t msg_size) {
    moe_err_t ret = MOE_OK;
    int fd = -1;
    *out = NULL;
    moe_st_file_t *file = calloc(1, sizeof *file);
    if (file == NULL || (file->path = strdup(path)) == NULL) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    do fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        ret = moe_err_fmt(msg, msg_size, errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO,
                          "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot stat: %s", path,
                          strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size < 8) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                          "%s: truncated: %lld bytes, the 8-byte header length is missing", path,
                          (long long)st.st_size);
        goto fail;
    }
    file->map_size = (size_t)st.st_size;
    void *map = mmap(NULL, file->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: mmap: %s", path, strerror(errno));
        goto fail;
    }
    file->map = map;
    close(fd); /* the mapping keeps the file alive */
    fd = -1;

    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | file->map[i];
    if (header_len > MOE_ST_MAX_HEADER) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                          "%s: header length %llu exceeds the limit of %u bytes", path,
                          (unsigned long long)header_len, MOE_ST_MAX_HEADER);
        goto fail;
    }
    if (header_len > file->map_size - 8) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                          "%s: truncated: header length %llu but only %zu bytes follow", path,
                          (unsigned long long)header_len, file->map_size - 8);
        goto fail;
    }
    MOE_CHECK_GOTO(st_parse_header(file, (const char *)file->map + 8, (size_t)header_len,
                                   file->map_size - 8 - (size_t)header_len,
                                   file->map + 8 + header_len, msg, msg_size),
                   ret, fail);
    *out = file;
    return MOE_OK;

fail:
    if (fd >= 0) close(fd);
    moe_st_close(file);
    return ret;
}

void moe_st_close(moe_st_file_t *file) {
    if (file == NULL) return;
    if (file->map != NULL) munmap((void *)file->map, file->map_size);
    cJSON_Delete(file->header);
    free(file->tensors);
    free(file->path);
    free(file);
}

const char *moe_st_path(const moe_st_file_t *file) { return file->path; }

int moe_st_count(const moe_st_file_t *file) { return file->count; }

const moe_st_tensor_t *moe_st_at(const moe_st_file_t *file, int index) {
    if (index < 0 || index >= file->count) return NULL;
    return &file->tensors[index];
}

const moe_st_tensor_t *moe_st_find(const moe_st_file_t *file, const char *name) {
    moe_st_tensor_t key = {.name = name};
    return bsearch(&key, file->tensors, (size_t)file->count, sizeof key, st_cmp_name);
}

/* IEEE half -> float, exact for every input: subnormals are normalised,
 * inf and NaN keep their class (and the NaN payload's top bits). */
static float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        /* Subnormal: value = mant * 2^-24; shift until the implicit bit. */
        int e = -1;
        do {
            mant <<= 1;
            e++;
        } while ((mant & 0x400u) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

moe_err_t moe_st_to_f32(const moe_st_tensor_t *tensor, float *dst, size_t n) {
    size_t elem_size = st_dtype_size(tensor->dtype);
    if (elem_size == 0) return MOE_ERR_UNSUPPORTED;
    if (n > tensor->n_bytes / elem_size) return MOE_ERR_RANGE;
    /* The data section has no alignment guarantee (the header length is
     * arbitrary), so every element is read with memcpy. */
    const uint8_t *src = tensor->data;
    switch (tensor->dtype) {
    case MOE_ST_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case MOE_ST_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = st_f16_to_f32(h);
        }
        break;
    case MOE_ST_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&dst[i], &bits, sizeof bits);
        }
        break;
    default:
        return MOE_ERR_UNSUPPORTED;
    }
    return MOE_OK;
}
