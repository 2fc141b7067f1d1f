/* frame: protocol v1 encoding, checking, parsing and dtype conversion (see
 * moe_frame.h). Every multi-byte field is read and written byte by byte in
 * little-endian order, so the code does not depend on host byte order or
 * alignment. */
#include "moe_frame.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *moe_status_name(uint32_t status) {
    switch (status) {
#define MOE_STATUS_NAME(name, value, text) \
    case value: return text;
        MOE_STATUS_LIST(MOE_STATUS_NAME)
#undef MOE_STATUS_NAME
    }
    return "unknown";
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void moe_frame_encode_header(const moe_frame_header_t *h, uint8_t out[MOE_FRAME_HEADER_SIZE]) {
    memcpy(out, MOE_FRAME_MAGIC, 4);
    put16(out + 4, h->version);
    put16(out + 6, h->type);
    put64(out + 8, h->request_id);
    put32(out + 16, h->layer);
    put32(out + 20, h->n_tokens);
    put32(out + 24, h->hidden);
    out[28] = h->dtype;
    out[29] = h->flags;
    put16(out + 30, h->top_k);
    put32(out + 32, h->status);
    put32(out + 36, 0);
    put64(out + 40, h->payload_len);
}

size_t moe_dtype_size(uint8_t dtype) {
    switch (dtype) {
    case MOE_DTYPE_F32: return 4;
    case MOE_DTYPE_BF16:
    case MOE_DTYPE_F16: return 2;
    default: return 0;
    }
}

uint64_t moe_frame_payload_size(uint8_t type, uint32_t n_tokens, uint32_t hidden, uint8_t dtype,
                                uint8_t flags, uint16_t top_k) {
    size_t size = moe_dtype_size(dtype);
    if (size == 0) return UINT64_MAX;
    /* n_tokens, hidden < 2^32 and size <= 4: the product fits in 66 bits at
     * worst, so check before multiplying */
    uint64_t values = (uint64_t)n_tokens * hidden;
    if (values > UINT64_MAX / 8) return UINT64_MAX;
    uint64_t bytes = values * size;
    if (type == MOE_FRAME_FORWARD && (flags & MOE_FRAME_FLAG_ROUTED))
        bytes += (uint64_t)n_tokens * top_k * 8; /* int32 ids + float32 weights */
    return bytes;
}

moe_frame_check_t moe_frame_decode_header(const uint8_t in[MOE_FRAME_HEADER_SIZE],
                                          uint64_t max_frame_bytes, moe_frame_header_t *h,
                                          char *msg, size_t msg_size) {
    memset(h, 0, sizeof *h);
    if (memcmp(in, MOE_FRAME_MAGIC, 4) != 0) {
        snprintf(msg, msg_size, "bad magic (expected \"MOED\")");
        return MOE_FRAME_BAD_MAGIC;
    }
    h->version = get16(in + 4);
    h->type = get16(in + 6);
    h->request_id = get64(in + 8);
    h->layer = get32(in + 16);
    h->n_tokens = get32(in + 20);
    h->hidden = get32(in + 24);
    h->dtype = in[28];
    h->flags = in[29];
    h->top_k = get16(in + 30);
    h->status = get32(in + 32);
    h->payload_len = get64(in + 40);
    if (h->version != MOE_FRAME_VERSION) {
        snprintf(msg, msg_size, "unsupported protocol version %u (this server speaks %d)",
                 h->version, MOE_FRAME_VERSION);
        return MOE_FRAME_BAD_VERSION;
    }
    if (h->type < MOE_FRAME_FORWARD || h->type > MOE_FRAME_PONG) {
        snprintf(msg, msg_size, "unknown frame type %u", h->type);
        return MOE_FRAME_BAD_TYPE;
    }
    /* compared as max - header so that a payload_len near 2^64 cannot wrap
     * the sum below the limit */
    if (max_frame_bytes < MOE_FRAME_HEADER_SIZE ||
        h->payload_len > max_frame_bytes - MOE_FRAME_HEADER_SIZE) {
        snprintf(msg, msg_size, "payload of %" PRIu64 " bytes exceeds serve.max_frame_bytes (%" PRIu64 ")",
                 h->payload_len, max_frame_bytes);
        return MOE_FRAME_TOO_LARGE;
    }
    bool shaped = h->type == MOE_FRAME_FORWARD || h->type == MOE_FRAME_RESULT;
    if (shaped && moe_dtype_size(h->dtype) != 0) {
        uint64_t want = moe_frame_payload_size((uint8_t)h->type, h->n_tokens, h->hidden, h->dtype,
                                               h->flags, h->top_k);
        if (want != h->payload_len) {
            snprintf(msg, msg_size,
                     "payload_len %" PRIu64 " does not match %u tokens x %u hidden of dtype %u%s "
                     "(%" PRIu64 " bytes)",
                     h->payload_len, h->n_tokens, h->hidden, h->dtype,
                     (h->flags & MOE_FRAME_FLAG_ROUTED) ? " with routing" : "", want);
            return MOE_FRAME_BAD_LENGTH;
        }
    }
    if ((h->type == MOE_FRAME_PING || h->type == MOE_FRAME_PONG) && h->payload_len > 4096) {
        snprintf(msg, msg_size, "PING/PONG payload of %" PRIu64 " bytes (at most 4096)", h->payload_len);
        return MOE_FRAME_BAD_LENGTH;
    }
    return MOE_FRAME_OK;
}

float moe_bf16_to_f32(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t moe_f32_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)mant, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    uint32_t bits = exp == 31 ? sign | 0x7f800000u | (mant << 13)
                              : sign | ((exp + 112) << 23) | (mant << 13);
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t moe_f32_to_f16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00; /* NaN */
    if (abs >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: inf */
    if (abs < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        float a;
        memcpy(&a, &abs, 4);
        return sign | (uint16_t)lrintf(a * 16777216.0f); /* units of 2^-24, ties to even */
    }
    uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

void moe_dtype_to_f32(uint8_t dtype, const void *src, float *dst, size_t n) {
    const uint8_t *p = src;
    switch (dtype) {
    case MOE_DTYPE_F32: memcpy(dst, src, n * 4); break;
    case MOE_DTYPE_BF16: /* in SIMD lanes (a request's 2M values: 0.7 ms one at a time) */
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            const uint32_t bits = (uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16;
            memcpy(dst + i, &bits, 4);
        }
        break;
    case MOE_DTYPE_F16:
        for (size_t i = 0; i < n; i++) dst[i] = moe_f16_to_f32(get16(p + 2 * i));
        break;
    default: break;
    }
}

void moe_dtype_from_f32(uint8_t dtype, const float *src, void *dst, size_t n) {
    uint8_t *p = dst;
    switch (dtype) {
    case MOE_DTYPE_F32: memcpy(dst, src, n * 4); break;
    case MOE_DTYPE_BF16: /* moe_f32_to_bf16 in SIMD lanes (2M values: 1.7 ms one at a time) */
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, src + i, 4);
            const uint32_t nan = (bits & 0x7fffffffu) > 0x7f800000u;
            const uint32_t v = nan ? (bits >> 16) | 0x40u : (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
            p[2 * i] = (uint8_t)v, p[2 * i + 1] = (uint8_t)(v >> 8);
        }
        break;
    case MOE_DTYPE_F16:
        for (size_t i = 0; i < n; i++) put16(p + 2 * i, moe_f32_to_f16(src[i]));
        break;
    default: break;
    }
}

void moe_frame_parser_init(moe_frame_parser_t *parser, uint64_t max_frame_bytes) {
    memset(parser, 0, sizeof *parser);
    parser->max_frame_bytes = max_frame_bytes;
}

void moe_frame_parser_reset(moe_frame_parser_t *parser) {
    free(parser->payload);
    uint64_t max = parser->max_frame_bytes;
    moe_frame_parser_init(parser, max);
}

moe_parse_result_t moe_frame_parse(moe_frame_parser_t *parser, const uint8_t *data, size_t len,
                                   size_t *consumed, moe_frame_header_t *header,
                                   uint8_t **payload) {
    size_t used = 0;
    *consumed = 0;
    if (!parser->in_payload) {
        size_t take = MOE_FRAME_HEADER_SIZE - parser->header_have;
        if (take > len) take = len;
        memcpy(parser->header_bytes + parser->header_have, data, take);
        parser->header_have += take;
        used += take;
        if (parser->header_have < MOE_FRAME_HEADER_SIZE) {
            *consumed = used;
            return MOE_PARSE_NEED_MORE;
        }
        parser->error = moe_frame_decode_header(parser->header_bytes, parser->max_frame_bytes,
                                                &parser->header, parser->error_msg,
                                                sizeof parser->error_msg);
        if (parser->error != MOE_FRAME_OK) {
            *consumed = used;
            return MOE_PARSE_ERROR;
        }
        parser->in_payload = true;
        parser->payload_have = 0;
        parser->payload = NULL;
        parser->rejected_status = 0;
        parser->rejected_msg[0] = '\0';
        if (parser->accept != NULL && parser->header.type == MOE_FRAME_FORWARD)
            parser->rejected_status = parser->accept(parser->accept_ctx, &parser->header, parser->rejected_msg,
                                                     sizeof parser->rejected_msg);
        if (parser->header.payload_len > 0 && parser->rejected_status == 0) {
            parser->payload = malloc((size_t)parser->header.payload_len);
            if (parser->payload == NULL) {
                parser->error = MOE_FRAME_TOO_LARGE;
                snprintf(parser->error_msg, sizeof parser->error_msg,
                         "cannot allocate %" PRIu64 " bytes", parser->header.payload_len);
                *consumed = used;
                return MOE_PARSE_ERROR;
            }
        }
    }
    uint64_t missing = parser->header.payload_len - parser->payload_have;
    size_t take = len - used;
    if (take > missing) take = (size_t)missing;
    /* a rejected frame's payload is skipped, never stored */
    if (take > 0 && parser->payload != NULL) memcpy(parser->payload + parser->payload_have, data + used, take);
    parser->payload_have += take;
    used += take;
    *consumed = used;
    if (parser->payload_have < parser->header.payload_len) return MOE_PARSE_NEED_MORE;
    *header = parser->header;
    *payload = parser->payload;
    parser->payload = NULL;
    parser->in_payload = false;
    parser->header_have = 0;
    return MOE_PARSE_FRAME;
}
