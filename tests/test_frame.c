/* test_frame: the protocol v1 codec (protocol/frame.c) — header layout,
 * every framing error, the incremental parser under arbitrary splits, and
 * the dtype conversions against independent references. */
#include <criterion/criterion.h>
#include <malloc.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../protocol/moe_frame.h"

#define BIG (1ull << 30)

static moe_frame_header_t forward_header(uint32_t n_tokens, uint32_t hidden, uint8_t dtype) {
    moe_frame_header_t h = {.version = 1, .type = MOE_FRAME_FORWARD, .request_id = 42,
                            .layer = 3, .n_tokens = n_tokens, .hidden = hidden, .dtype = dtype};
    h.payload_len = moe_frame_payload_size(MOE_FRAME_FORWARD, n_tokens, hidden, dtype, 0, 0);
    return h;
}

static uint64_t rd_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

Test(frame, header_layout_and_round_trip, .timeout = 5) {
    moe_frame_header_t h = {.version = 1, .type = MOE_FRAME_FORWARD,
                            .request_id = 0x0102030405060708ull, .layer = 0xA1A2A3A4u,
                            .n_tokens = 3, .hidden = 5, .dtype = MOE_DTYPE_BF16,
                            .flags = MOE_FRAME_FLAG_ROUTED, .top_k = 2, .status = 0x0B0C0D0Eu};
    h.payload_len = 3 * 5 * 2 + 3 * 2 * 8;
    uint8_t b[MOE_FRAME_HEADER_SIZE];
    memset(b, 0xEE, sizeof b);
    moe_frame_encode_header(&h, b);
    /* offsets from the PROTOCOL.md table, read independently */
    cr_assert(memcmp(b, "MOED", 4) == 0);
    cr_assert_eq(rd_le(b + 4, 2), 1);
    cr_assert_eq(rd_le(b + 6, 2), 1);
    cr_assert_eq(rd_le(b + 8, 8), 0x0102030405060708ull);
    cr_assert_eq(b[8], 0x08); /* little-endian */
    cr_assert_eq(rd_le(b + 16, 4), 0xA1A2A3A4u);
    cr_assert_eq(rd_le(b + 20, 4), 3);
    cr_assert_eq(rd_le(b + 24, 4), 5);
    cr_assert_eq(b[28], 2);
    cr_assert_eq(b[29], 1);
    cr_assert_eq(rd_le(b + 30, 2), 2);
    cr_assert_eq(rd_le(b + 32, 4), 0x0B0C0D0Eu);
    cr_assert_eq(rd_le(b + 36, 4), 0);
    cr_assert_eq(rd_le(b + 40, 8), 78);
    moe_frame_header_t d;
    char msg[160];
    cr_assert_eq(moe_frame_decode_header(b, BIG, &d, msg, sizeof msg), MOE_FRAME_OK, "%s", msg);
    cr_assert_eq(d.request_id, h.request_id);
    cr_assert_eq(d.layer, h.layer);
    cr_assert_eq(d.n_tokens, 3);
    cr_assert_eq(d.hidden, 5);
    cr_assert_eq(d.dtype, MOE_DTYPE_BF16);
    cr_assert_eq(d.flags, 1);
    cr_assert_eq(d.top_k, 2);
    cr_assert_eq(d.status, h.status);
    cr_assert_eq(d.payload_len, 78);
}

static moe_frame_check_t decode(const moe_frame_header_t *h, uint64_t max) {
    uint8_t b[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(h, b);
    moe_frame_header_t d;
    char msg[160];
    return moe_frame_decode_header(b, max, &d, msg, sizeof msg);
}

Test(frame, framing_errors, .timeout = 5) {
    moe_frame_header_t h = forward_header(4, 8, MOE_DTYPE_F32);
    cr_assert_eq(decode(&h, BIG), MOE_FRAME_OK);
    uint8_t b[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, b);
    b[0] = 'X';
    moe_frame_header_t d;
    char msg[160];
    cr_assert_eq(moe_frame_decode_header(b, BIG, &d, msg, sizeof msg), MOE_FRAME_BAD_MAGIC);

    moe_frame_header_t v = h;
    v.version = 2;
    cr_assert_eq(decode(&v, BIG), MOE_FRAME_BAD_VERSION);
    v.version = 0;
    cr_assert_eq(decode(&v, BIG), MOE_FRAME_BAD_VERSION);
    for (uint16_t type = 0; type < 10; type++) {
        moe_frame_header_t t = h;
        t.type = type;
        if (type == MOE_FRAME_PING || type == MOE_FRAME_PONG || type == MOE_FRAME_ERROR)
            t.payload_len = 16;
        moe_frame_check_t want = (type >= 1 && type <= 5) ? MOE_FRAME_OK : MOE_FRAME_BAD_TYPE;
        cr_assert_eq(decode(&t, BIG), want, "type %u", type);
    }
    moe_frame_header_t l = h;
    l.payload_len += 1;
    cr_assert_eq(decode(&l, BIG), MOE_FRAME_BAD_LENGTH);
    l.payload_len -= 2;
    cr_assert_eq(decode(&l, BIG), MOE_FRAME_BAD_LENGTH);
    /* ROUTED adds n_tokens*top_k*(4+4) bytes */
    moe_frame_header_t r = h;
    r.flags = MOE_FRAME_FLAG_ROUTED;
    r.top_k = 2;
    cr_assert_eq(decode(&r, BIG), MOE_FRAME_BAD_LENGTH);
    r.payload_len = 4 * 8 * 4 + 4 * 2 * 8;
    cr_assert_eq(decode(&r, BIG), MOE_FRAME_OK);
    r.flags = 0;
    cr_assert_eq(decode(&r, BIG), MOE_FRAME_BAD_LENGTH);
    /* a RESULT never carries routing */
    moe_frame_header_t res = h;
    res.type = MOE_FRAME_RESULT;
    res.flags = MOE_FRAME_FLAG_ROUTED;
    res.top_k = 2;
    cr_assert_eq(decode(&res, BIG), MOE_FRAME_OK);
    /* bf16 halves the size */
    moe_frame_header_t half = forward_header(4, 8, MOE_DTYPE_BF16);
    cr_assert_eq(half.payload_len, 64);
    cr_assert_eq(decode(&half, BIG), MOE_FRAME_OK);
    /* over max_frame_bytes, header included */
    cr_assert_eq(decode(&h, 128 + 48), MOE_FRAME_OK);
    cr_assert_eq(decode(&h, 128 + 47), MOE_FRAME_TOO_LARGE);
    /* PING payload over 4096 */
    moe_frame_header_t p = {.version = 1, .type = MOE_FRAME_PING, .payload_len = 4097};
    cr_assert_eq(decode(&p, BIG), MOE_FRAME_BAD_LENGTH);
    p.payload_len = 4096;
    cr_assert_eq(decode(&p, BIG), MOE_FRAME_OK);
    /* unknown dtype is left to the caller (bad_dtype), payload still delimits */
    moe_frame_header_t ud = h;
    ud.dtype = 9;
    ud.payload_len = 7;
    cr_assert_eq(decode(&ud, BIG), MOE_FRAME_OK);
}

Test(frame, overflow_sized_shapes, .timeout = 5) {
    cr_assert_eq(moe_frame_payload_size(MOE_FRAME_FORWARD, UINT32_MAX, UINT32_MAX, MOE_DTYPE_F32,
                                        0, 0),
                 UINT64_MAX);
    cr_assert_eq(moe_frame_payload_size(MOE_FRAME_FORWARD, 1, 1, 7, 0, 0), UINT64_MAX);
    cr_assert_eq(moe_frame_payload_size(MOE_FRAME_FORWARD, 65536, 65536, MOE_DTYPE_F32, 0, 0),
                 (uint64_t)1 << 34);
    /* a header whose n_tokens*hidden*4 wraps modulo 2^64 to a small number
     * must not match that small payload_len */
    moe_frame_header_t h = forward_header(1, 1, MOE_DTYPE_F32);
    h.n_tokens = 0x80000000u;
    h.hidden = 0x80000000u; /* 2^62 values * 4 = 2^64 -> 0 when wrapped */
    h.payload_len = 0;
    cr_assert_eq(decode(&h, UINT64_MAX), MOE_FRAME_BAD_LENGTH);
    h.n_tokens = h.hidden = UINT32_MAX;
    h.payload_len = 4;
    cr_assert_neq(decode(&h, UINT64_MAX), MOE_FRAME_OK);
    h.payload_len = UINT64_MAX;
    cr_assert_eq(decode(&h, UINT64_MAX), MOE_FRAME_TOO_LARGE);
}

/* n frames of varied types into one buffer; returns its length */
static size_t build_stream(uint8_t *buf, int n_frames) {
    size_t len = 0;
    for (int i = 0; i < n_frames; i++) {
        moe_frame_header_t h;
        if (i % 3 == 2) {
            h = (moe_frame_header_t){.version = 1, .type = MOE_FRAME_PING, .request_id = (uint64_t)i,
                                     .payload_len = (uint64_t)i};
        } else {
            h = forward_header((uint32_t)(i + 1), 3, i % 2 ? MOE_DTYPE_F16 : MOE_DTYPE_F32);
            h.request_id = (uint64_t)i;
        }
        moe_frame_encode_header(&h, buf + len);
        len += MOE_FRAME_HEADER_SIZE;
        for (uint64_t k = 0; k < h.payload_len; k++) buf[len++] = (uint8_t)(i * 31 + k);
    }
    return len;
}

/* Feeds the stream in chunks chosen by next_chunk and checks every frame. */
static void parse_in_chunks(const uint8_t *buf, size_t len, int n_frames, unsigned seed,
                            int byte_by_byte) {
    moe_frame_parser_t p;
    moe_frame_parser_init(&p, BIG);
    srand(seed);
    size_t off = 0;
    int seen = 0;
    while (off < len) {
        size_t chunk = byte_by_byte ? 1 : 1 + (size_t)rand() % 97;
        if (chunk > len - off) chunk = len - off;
        size_t pos = 0;
        while (pos < chunk) {
            size_t consumed;
            moe_frame_header_t h;
            uint8_t *payload = NULL;
            moe_parse_result_t r = moe_frame_parse(&p, buf + off + pos, chunk - pos, &consumed, &h,
                                                   &payload);
            cr_assert_neq(r, MOE_PARSE_ERROR, "seed %u: %s", seed, p.error_msg);
            cr_assert(consumed > 0 || r == MOE_PARSE_FRAME, "seed %u: no progress", seed);
            pos += consumed;
            if (r == MOE_PARSE_FRAME) {
                cr_assert_eq(h.request_id, (uint64_t)seen, "seed %u", seed);
                for (uint64_t k = 0; k < h.payload_len; k++)
                    cr_assert_eq(payload[k], (uint8_t)(seen * 31 + k), "seed %u frame %d byte %lu",
                                 seed, seen, (unsigned long)k);
                if (h.payload_len == 0) cr_assert_null(payload);
                free(payload);
                seen++;
            } else {
                cr_assert_eq(pos, chunk, "NEED_MORE must consume everything");
            }
        }
        off += chunk;
    }
    cr_assert_eq(seen, n_frames, "seed %u: %d of %d frames", seed, seen, n_frames);
    cr_assert_eq(p.header_have, 0);
    cr_assert(!p.in_payload);
    moe_frame_parser_reset(&p);
}

Test(frame, parser_byte_by_byte, .timeout = 10) {
    static uint8_t buf[1 << 16];
    size_t len = build_stream(buf, 12);
    parse_in_chunks(buf, len, 12, 1, 1);
}

Test(frame, parser_random_splits_and_pipelined, .timeout = 20) {
    static uint8_t buf[1 << 16];
    size_t len = build_stream(buf, 20);
    for (unsigned seed = 1; seed <= 200; seed++) parse_in_chunks(buf, len, 20, seed, 0);
    /* all frames in one call sequence over one buffer */
    moe_frame_parser_t p;
    moe_frame_parser_init(&p, BIG);
    size_t off = 0;
    int seen = 0;
    while (off < len) {
        size_t consumed;
        moe_frame_header_t h;
        uint8_t *payload;
        cr_assert_eq(moe_frame_parse(&p, buf + off, len - off, &consumed, &h, &payload),
                     MOE_PARSE_FRAME);
        cr_assert_eq(h.request_id, (uint64_t)seen++);
        free(payload);
        off += consumed;
    }
    cr_assert_eq(seen, 20);
}

Test(frame, lying_header_allocates_nothing, .timeout = 5) {
    moe_frame_parser_t p;
    moe_frame_parser_init(&p, 1 << 20);
    moe_frame_header_t h = {.version = 1, .type = MOE_FRAME_ERROR, .payload_len = 1ull << 40};
    uint8_t b[MOE_FRAME_HEADER_SIZE + 16];
    moe_frame_encode_header(&h, b);
    memset(b + MOE_FRAME_HEADER_SIZE, 'A', 16);
    struct mallinfo2 before = mallinfo2();
    size_t consumed;
    moe_frame_header_t out;
    uint8_t *payload = (uint8_t *)0x1;
    moe_parse_result_t r = moe_frame_parse(&p, b, sizeof b, &consumed, &out, &payload);
    struct mallinfo2 after = mallinfo2();
    cr_assert_eq(r, MOE_PARSE_ERROR);
    cr_assert_eq(p.error, MOE_FRAME_TOO_LARGE);
    cr_assert_eq(consumed, MOE_FRAME_HEADER_SIZE, "nothing past the bad header is consumed");
    cr_assert_null(p.payload);
    cr_assert_eq(payload, (uint8_t *)0x1, "no payload handed out");
    cr_assert_eq(after.hblkhd, before.hblkhd, "no mmap'd block was allocated");
    cr_assert_eq(after.uordblks, before.uordblks, "no heap block was allocated");
    /* a FORWARD whose payload_len lies about its shape fails the same way */
    moe_frame_parser_init(&p, UINT64_MAX);
    moe_frame_header_t f = forward_header(2, 2, MOE_DTYPE_F32);
    f.payload_len = 1ull << 50;
    moe_frame_encode_header(&f, b);
    r = moe_frame_parse(&p, b, MOE_FRAME_HEADER_SIZE, &consumed, &out, &payload);
    cr_assert_eq(r, MOE_PARSE_ERROR);
    cr_assert_eq(p.error, MOE_FRAME_BAD_LENGTH);
    cr_assert_null(p.payload);
}

/* The accept hook refuses a FORWARD from its header: its payload is skipped
 * without being stored, the frame comes back with no payload and the
 * refusal, and the next frame on the stream parses normally. */
static uint32_t refuse_big(void *ctx, const moe_frame_header_t *h, char *msg, size_t msg_size) {
    (*(int *)ctx)++;
    if (h->n_tokens <= 4) return 0;
    snprintf(msg, msg_size, "%u tokens is too many", h->n_tokens);
    return MOE_STATUS_TOO_LARGE;
}

Test(frame, accept_hook_skips_refused_payloads, .timeout = 5) {
    moe_frame_parser_t p;
    int calls = 0;
    moe_frame_parser_init(&p, 1 << 30);
    p.accept = refuse_big;
    p.accept_ctx = &calls;
    moe_frame_header_t big = forward_header(1000, 256, MOE_DTYPE_F32), small = forward_header(2, 8, MOE_DTYPE_F32);
    size_t big_len = MOE_FRAME_HEADER_SIZE + (size_t)big.payload_len;
    size_t total = big_len + MOE_FRAME_HEADER_SIZE + (size_t)small.payload_len;
    uint8_t *stream = malloc(total);
    cr_assert_not_null(stream);
    moe_frame_encode_header(&big, stream);
    memset(stream + MOE_FRAME_HEADER_SIZE, 0x5a, (size_t)big.payload_len);
    moe_frame_encode_header(&small, stream + big_len);
    for (size_t i = 0; i < small.payload_len; i++) stream[big_len + MOE_FRAME_HEADER_SIZE + i] = (uint8_t)i;
    struct mallinfo2 before = mallinfo2();
    size_t at = 0, consumed;
    moe_frame_header_t out;
    uint8_t *payload = (uint8_t *)0x1;
    moe_parse_result_t r = MOE_PARSE_NEED_MORE;
    while (r == MOE_PARSE_NEED_MORE && at < big_len) { /* the refused frame, in 4 KiB pieces */
        size_t piece = big_len - at < 4096 ? big_len - at : 4096;
        r = moe_frame_parse(&p, stream + at, piece, &consumed, &out, &payload);
        at += consumed;
    }
    struct mallinfo2 after = mallinfo2();
    cr_assert_eq(r, MOE_PARSE_FRAME);
    cr_assert_eq(at, big_len);
    cr_assert_null(payload, "a refused payload is not handed out");
    cr_assert_eq(p.rejected_status, MOE_STATUS_TOO_LARGE);
    cr_assert(strstr(p.rejected_msg, "1000 tokens") != NULL, "%s", p.rejected_msg);
    cr_assert_eq(after.uordblks, before.uordblks, "a refused payload allocates nothing");
    cr_assert_eq(after.hblkhd, before.hblkhd, "a refused payload allocates nothing");
    r = moe_frame_parse(&p, stream + at, total - at, &consumed, &out, &payload);
    cr_assert_eq(r, MOE_PARSE_FRAME);
    cr_assert_eq(p.rejected_status, 0);
    cr_assert_eq(out.n_tokens, 2);
    cr_assert_not_null(payload);
    for (size_t i = 0; i < small.payload_len; i++) cr_assert_eq(payload[i], (uint8_t)i);
    cr_assert_eq(calls, 2);
    free(payload);
    free(stream);
}

/* ---- dtype conversions ---- */

static float f32_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

Test(frame, bf16_known_values, .timeout = 5) {
    cr_assert_eq(moe_f32_to_bf16(1.0f), 0x3F80);
    cr_assert_eq(moe_f32_to_bf16(-2.0f), 0xC000);
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x3F808000u)), 0x3F80, "tie to even (down)");
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x3F818000u)), 0x3F82, "tie to even (up)");
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x3F808001u)), 0x3F81, "above the tie");
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x3F807FFFu)), 0x3F80, "below the tie");
    cr_assert_eq(moe_f32_to_bf16(INFINITY), 0x7F80);
    cr_assert_eq(moe_f32_to_bf16(-INFINITY), 0xFF80);
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x7F7FFFFFu)), 0x7F80, "FLT_MAX rounds to inf");
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x00018000u)), 0x0002, "subnormal tie to even");
    cr_assert_eq(moe_f32_to_bf16(f32_of(0x80010000u)), 0x8001, "negative subnormal");
    cr_assert_eq(moe_f32_to_bf16(0.1f), 0x3DCD);
    uint16_t nan = moe_f32_to_bf16(NAN);
    cr_assert_eq(nan & 0x7F80, 0x7F80);
    cr_assert_neq(nan & 0x007F, 0, "NaN stays NaN");
    /* a signalling NaN whose payload lives only in the low bits */
    uint16_t snan = moe_f32_to_bf16(f32_of(0x7F800001u));
    cr_assert(isnan(moe_bf16_to_f32(snan)), "low-payload NaN must not become inf");
    cr_assert_eq(moe_bf16_to_f32(0x3F80), 1.0f);
    cr_assert_eq(moe_bf16_to_f32(0xC0490000u >> 16), -3.140625f);
    cr_assert(isinf(moe_bf16_to_f32(0xFF80)) && moe_bf16_to_f32(0xFF80) < 0);
}

/* The bulk bf16 conversions (in SIMD lanes) give exactly what the scalar
 * ones give, value by value, little-endian on the wire, on random bit
 * patterns (NaNs with low payloads, infinities, subnormals, ties among
 * them), an odd count, at an odd byte offset. */
Test(frame, bf16_bulk_matches_scalar, .timeout = 10) {
    const unsigned seed = (unsigned)time(NULL);
    srand(seed);
    const size_t n = 100003;
    float *src = malloc(sizeof(float) * n), *back = malloc(sizeof(float) * n);
    uint8_t *wire = malloc(2 * n + 1);
    cr_assert(src && back && wire);
    const uint32_t special[] = {0x7F800001u, 0xFF800000u, 0x7F800000u, 0x00018000u, 0x3F808000u, 0x3F818000u,
                                0x7F7FFFFFu, 0x80010000u, 0x7FC00000u, 0x00000000u, 0x80000000u};
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = ((uint32_t)rand() << 16) ^ (uint32_t)rand();
        if (i % 11 == 0) bits = (bits & 0xFFFF0000u) | 0x8000u; /* a tie */
        if (i % 7 == 0) bits = special[(i / 7) % (sizeof special / sizeof special[0])];
        memcpy(&src[i], &bits, 4);
    }
    moe_dtype_from_f32(MOE_DTYPE_BF16, src, wire + 1, n);
    for (size_t i = 0; i < n; i++) {
        const uint16_t want = moe_f32_to_bf16(src[i]), got = (uint16_t)(wire[1 + 2 * i] | (wire[2 + 2 * i] << 8));
        uint32_t bits;
        memcpy(&bits, &src[i], 4);
        cr_assert_eq(got, want, "seed %u: value %zu (bits %08x): bulk %04x, scalar %04x", seed, i, (unsigned)bits,
                     got, want);
    }
    moe_dtype_to_f32(MOE_DTYPE_BF16, wire + 1, back, n);
    for (size_t i = 0; i < n; i++) {
        const float want = moe_bf16_to_f32((uint16_t)(wire[1 + 2 * i] | (wire[2 + 2 * i] << 8)));
        cr_assert(memcmp(&back[i], &want, 4) == 0, "seed %u: value %zu back to float32 differs", seed, i);
    }
    free(src);
    free(back);
    free(wire);
}

Test(frame, f16_known_values, .timeout = 5) {
    cr_assert_eq(moe_f32_to_f16(1.0f), 0x3C00);
    cr_assert_eq(moe_f32_to_f16(-2.0f), 0xC000);
    cr_assert_eq(moe_f32_to_f16(0.1f), 0x2E66);
    cr_assert_eq(moe_f32_to_f16(65504.0f), 0x7BFF);
    cr_assert_eq(moe_f32_to_f16(65519.0f), 0x7BFF);
    cr_assert_eq(moe_f32_to_f16(65520.0f), 0x7C00, "tie at the top rounds to inf");
    cr_assert_eq(moe_f32_to_f16(1e10f), 0x7C00);
    cr_assert_eq(moe_f32_to_f16(-INFINITY), 0xFC00);
    cr_assert_eq(moe_f32_to_f16(1.0f + 0x1p-11f), 0x3C00, "tie to even (down)");
    cr_assert_eq(moe_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3C02, "tie to even (up)");
    cr_assert_eq(moe_f32_to_f16(0x1p-14f), 0x0400, "smallest normal");
    cr_assert_eq(moe_f32_to_f16(0x1p-24f), 0x0001, "smallest subnormal");
    cr_assert_eq(moe_f32_to_f16(0x1p-25f), 0x0000, "half the smallest subnormal ties to 0");
    cr_assert_eq(moe_f32_to_f16(3 * 0x1p-25f), 0x0002, "1.5 units ties to 2");
    cr_assert_eq(moe_f32_to_f16(-0x1p-24f), 0x8001);
    cr_assert_eq(moe_f32_to_f16(0x1p-14f - 0x1p-25f), 0x0400, "rounds up into the normals");
    cr_assert_eq(moe_f32_to_f16(-0.0f), 0x8000);
    uint16_t nan = moe_f32_to_f16(NAN);
    cr_assert(((nan & 0x7C00) == 0x7C00) && (nan & 0x3FF));
    cr_assert_eq(moe_f16_to_f32(0x0001), 0x1p-24f);
    cr_assert_eq(moe_f16_to_f32(0x03FF), 1023 * 0x1p-24f);
    cr_assert_eq(moe_f16_to_f32(0x7BFF), 65504.0f);
    cr_assert_eq(moe_f16_to_f32(0xC000), -2.0f);
    cr_assert(isinf(moe_f16_to_f32(0x7C00)));
    cr_assert(isnan(moe_f16_to_f32(0x7E00)));
    cr_assert(signbit(moe_f16_to_f32(0x8000)) && moe_f16_to_f32(0x8000) == 0.0f);
}

/* Independent decoders: the value of a code from the IEEE formula. */
static double ref_f16_value(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v = exp == 0 ? ldexp(mant, -24) : exp == 31 ? 65536.0 /* inf, as for rounding */
                                                       : ldexp(1024 + mant, exp - 25);
    return sign ? -v : v;
}
static double ref_bf16_value(uint16_t b) {
    int sign = b >> 15, exp = (b >> 7) & 0xff, mant = b & 0x7f;
    double v = exp == 0 ? ldexp(mant, -133) : exp == 255 ? ldexp(1.0, 128)
                                                         : ldexp(128 + mant, exp - 134);
    return sign ? -v : v;
}

/* The chosen code is at least as close as both neighbours, and even on a tie. */
static void check_nearest_even(float v, uint16_t code, double (*value)(uint16_t), uint16_t inf_code,
                               const char *what, unsigned seed) {
    uint16_t mag = code & 0x7fff;
    cr_assert(mag <= inf_code, "%s: %a gave NaN code %04x (seed %u)", what, v, code, seed);
    double d = fabs(value(code) - (double)v);
    for (int delta = -1; delta <= 1; delta += 2) {
        int nm = (int)mag + delta;
        if (nm < 0 || nm > inf_code) continue;
        uint16_t nb = (uint16_t)((code & 0x8000) | nm);
        double dn = fabs(value(nb) - (double)v);
        cr_assert(d <= dn, "%s: %a -> %04x, but %04x is closer (seed %u)", what, v, code, nb, seed);
        if (d == dn) cr_assert((mag & 1) == 0, "%s: %a tie not to even (seed %u)", what, v, seed);
    }
    if (mag == 0) /* zero: the other-sign neighbour is itself */
        cr_assert(d <= fabs(value(1) - fabs((double)v)));
}

Test(frame, conversions_match_reference_on_random_values, .timeout = 20) {
    unsigned seed = (unsigned)time(NULL);
    srand(seed);
    for (int i = 0; i < 400000; i++) {
        uint32_t bits = ((uint32_t)rand() << 16) ^ (uint32_t)rand() ^ ((uint32_t)rand() << 31);
        /* keep most values in or near f16 range so both regimes are hit */
        if (i % 2) bits = (bits & 0x807fffffu) | ((uint32_t)(96 + rand() % 50) << 23);
        if (i % 7 == 0) bits &= 0xffff8000u | (uint32_t)(rand() & 1) << 15; /* near ties */
        float v = f32_of(bits);
        if (isnan(v) || isinf(v)) continue;
        check_nearest_even(v, moe_f32_to_bf16(v), ref_bf16_value, 0x7f80, "bf16", seed);
        check_nearest_even(v, moe_f32_to_f16(v), ref_f16_value, 0x7c00, "f16", seed);
    }
}

Test(frame, every_f16_and_bf16_code_round_trips, .timeout = 10) {
    for (uint32_t code = 0; code < 65536; code++) {
        uint16_t c = (uint16_t)code;
        float h = moe_f16_to_f32(c), b = moe_bf16_to_f32(c);
        if ((c & 0x7c00) == 0x7c00 && (c & 0x3ff)) {
            cr_assert(isnan(h));
            cr_assert(isnan(moe_f16_to_f32(moe_f32_to_f16(h))));
        } else {
            cr_assert_eq((double)h, ref_f16_value(c) * ((c & 0x7fff) == 0x7c00 ? INFINITY : 1),
                         "f16 %04x", c);
            cr_assert_eq(moe_f32_to_f16(h), c, "f16 %04x", c);
        }
        if ((c & 0x7f80) == 0x7f80 && (c & 0x7f)) {
            cr_assert(isnan(b));
        } else {
            cr_assert_eq(moe_f32_to_bf16(b), c, "bf16 %04x", c);
        }
    }
}

Test(frame, bulk_conversion_is_little_endian_and_unaligned, .timeout = 5) {
    float src[3] = {1.0f, -2.0f, 0.1f};
    uint8_t raw[1 + 6];
    moe_dtype_from_f32(MOE_DTYPE_F16, src, raw + 1, 3); /* odd address on purpose */
    cr_assert_eq(raw[1], 0x00);
    cr_assert_eq(raw[2], 0x3C);
    cr_assert_eq(raw[3], 0x00);
    cr_assert_eq(raw[4], 0xC0);
    cr_assert_eq(raw[5], 0x66);
    cr_assert_eq(raw[6], 0x2E);
    float back[3];
    moe_dtype_to_f32(MOE_DTYPE_F16, raw + 1, back, 3);
    cr_assert_eq(back[0], 1.0f);
    cr_assert_eq(back[1], -2.0f);
    cr_assert_float_eq(back[2], 0.0999755859375f, 0);
    moe_dtype_from_f32(MOE_DTYPE_BF16, src, raw + 1, 3);
    cr_assert_eq(raw[1], 0x80);
    cr_assert_eq(raw[2], 0x3F);
    cr_assert_eq(raw[5], 0xCD);
    cr_assert_eq(raw[6], 0x3D);
    cr_assert_str_eq(moe_status_name(5), "overloaded");
    cr_assert_str_eq(moe_status_name(10), "bad_routing");
    cr_assert_str_eq(moe_status_name(77), "unknown");
}
