/* moe_frame: the data-plane wire format, protocol v1 (DESIGN §8) — a 48-byte
 * little-endian header and a payload. Owns encoding, incremental decoding
 * (a parser that says "need more" on partial input and never trusts a
 * length), and the f32/bf16/f16 conversions done at the edge. Used by the
 * daemon's server, libmoeclient, moectl and the fuzz harness; knows nothing
 * of kernels. */
#ifndef MOE_FRAME_H
#define MOE_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOE_FRAME_MAGIC "MOED"
#define MOE_FRAME_VERSION 1
#define MOE_FRAME_HEADER_SIZE 48

typedef enum {
    MOE_FRAME_FORWARD = 1,
    MOE_FRAME_RESULT = 2,
    MOE_FRAME_ERROR = 3,
    MOE_FRAME_PING = 4,
    MOE_FRAME_PONG = 5,
} moe_frame_type_t;

typedef enum { MOE_DTYPE_F32 = 1, MOE_DTYPE_BF16 = 2, MOE_DTYPE_F16 = 3 } moe_dtype_t;

#define MOE_FRAME_FLAG_ROUTED 0x1u

/* ERROR status codes (the `status` field), one table with their names. */
#define MOE_STATUS_LIST(X)            \
    X(MOE_STATUS_OK, 0, "ok")         \
    X(MOE_STATUS_BAD_LAYER, 1, "bad_layer") \
    X(MOE_STATUS_BAD_SHAPE, 2, "bad_shape") \
    X(MOE_STATUS_BAD_DTYPE, 3, "bad_dtype") \
    X(MOE_STATUS_TOO_LARGE, 4, "too_large") \
    X(MOE_STATUS_OVERLOADED, 5, "overloaded") \
    X(MOE_STATUS_SHUTTING_DOWN, 6, "shutting_down") \
    X(MOE_STATUS_TIMEOUT, 7, "timeout") \
    X(MOE_STATUS_INTERNAL, 8, "internal") \
    X(MOE_STATUS_BAD_FRAME, 9, "bad_frame") \
    X(MOE_STATUS_BAD_ROUTING, 10, "bad_routing")

typedef enum {
#define MOE_STATUS_ENUM(name, value, text) name = value,
    MOE_STATUS_LIST(MOE_STATUS_ENUM)
#undef MOE_STATUS_ENUM
} moe_status_t;

#define MOE_STATUS_COUNT 11

/* Name of a status ("overloaded"); "unknown" for codes outside the table. */
const char *moe_status_name(uint32_t status);

typedef struct {
    uint16_t version;
    uint16_t type;
    uint64_t request_id;
    uint32_t layer;
    uint32_t n_tokens;
    uint32_t hidden;
    uint8_t dtype;
    uint8_t flags;
    uint16_t top_k;
    uint32_t status;
    uint64_t payload_len;
} moe_frame_header_t;

/* Writes the 48-byte header into out. */
void moe_frame_encode_header(const moe_frame_header_t *header, uint8_t out[MOE_FRAME_HEADER_SIZE]);

typedef enum {
    MOE_FRAME_OK = 0,        /* header decoded and consistent */
    MOE_FRAME_BAD_MAGIC,
    MOE_FRAME_BAD_VERSION,
    MOE_FRAME_BAD_TYPE,
    MOE_FRAME_BAD_LENGTH,    /* payload_len does not match the header's shape */
    MOE_FRAME_TOO_LARGE,     /* payload_len over the configured frame limit */
} moe_frame_check_t;

/* Decodes and checks a header: magic, version, type, and for FORWARD and
 * RESULT that payload_len equals the size implied by n_tokens, hidden,
 * dtype (and top_k with ROUTED), computed without overflow; payload_len is
 * also checked against max_frame_bytes (header included). A framing error
 * means the stream cannot be resynchronised: the caller answers and closes.
 * A FORWARD with an unknown dtype is MOE_FRAME_OK here (the caller answers
 * bad_dtype and skips the payload, which payload_len still delimits). */
moe_frame_check_t moe_frame_decode_header(const uint8_t in[MOE_FRAME_HEADER_SIZE],
                                          uint64_t max_frame_bytes, moe_frame_header_t *header,
                                          char *msg, size_t msg_size);

/* Bytes per value of a dtype, 0 for an unknown one. */
size_t moe_dtype_size(uint8_t dtype);

/* Payload bytes a FORWARD/RESULT of this shape must carry, or UINT64_MAX on
 * overflow or unknown dtype. */
uint64_t moe_frame_payload_size(uint8_t type, uint32_t n_tokens, uint32_t hidden, uint8_t dtype,
                                uint8_t flags, uint16_t top_k);

/* Conversions at the edge; src and dst need no alignment. bf16/f16 outputs
 * are rounded to nearest even; NaN stays NaN. */
void moe_dtype_to_f32(uint8_t dtype, const void *src, float *dst, size_t n);
void moe_dtype_from_f32(uint8_t dtype, const float *src, void *dst, size_t n);
float moe_bf16_to_f32(uint16_t value);
uint16_t moe_f32_to_bf16(float value);
float moe_f16_to_f32(uint16_t value);
uint16_t moe_f32_to_f16(float value);

/* An incremental parser for one connection: feed bytes as they arrive;
 * it yields whole frames (header + payload) one at a time. */
typedef enum {
    MOE_PARSE_NEED_MORE = 0, /* consumed everything given; no frame yet */
    MOE_PARSE_FRAME,         /* a frame is ready: header + payload */
    MOE_PARSE_ERROR,         /* framing error: answer, then close */
} moe_parse_result_t;

/* Optional admission check, called once a FORWARD header is complete and
 * before its payload is allocated: returns 0 to receive the payload, or a
 * status (MOE_STATUS_*) to skip it without allocating anything; the frame
 * is then returned with payload NULL and parser->rejected_status set. */
typedef uint32_t (*moe_frame_accept_fn)(void *ctx, const moe_frame_header_t *header, char *msg, size_t msg_size);

typedef struct {
    uint64_t max_frame_bytes;
    uint8_t header_bytes[MOE_FRAME_HEADER_SIZE];
    size_t header_have;
    moe_frame_header_t header;
    uint8_t *payload;   /* owned; handed to the caller with the frame */
    uint64_t payload_have;
    bool in_payload;
    moe_frame_check_t error;
    char error_msg[160];
    moe_frame_accept_fn accept; /* NULL: every frame is received */
    void *accept_ctx;
    uint32_t rejected_status;   /* of the frame just returned (0: accepted) */
    char rejected_msg[200];
} moe_frame_parser_t;

void moe_frame_parser_init(moe_frame_parser_t *parser, uint64_t max_frame_bytes);
/* Frees a payload still being received. */
void moe_frame_parser_reset(moe_frame_parser_t *parser);

/* Consumes up to len bytes of data, sets *consumed. On MOE_PARSE_FRAME the
 * caller takes *header and *payload (malloc'd, may be NULL when empty; the
 * caller frees it) and calls again with the rest. The payload is allocated
 * only after the header passed every check, so a lying header costs nothing.
 * Returns MOE_PARSE_ERROR with parser->error / error_msg set. */
moe_parse_result_t moe_frame_parse(moe_frame_parser_t *parser, const uint8_t *data, size_t len,
                                   size_t *consumed, moe_frame_header_t *header,
                                   uint8_t **payload);

#endif
