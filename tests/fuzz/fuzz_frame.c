/* fuzz_frame: libFuzzer harness for the data-plane parser (DESIGN §11).
 * The input is split into chunks at sizes taken from its first bytes, so
 * the fuzzer explores both the header checks and every way a stream can be
 * cut between reads. Invariants checked (abort on violation): progress on
 * every call, a frame's payload_len never above the limit, payload present
 * exactly when payload_len > 0, and no leak (ASan) on any path.
 *
 * Build and run (not part of `make test`):
 *   clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined \
 *       tests/fuzz/fuzz_frame.c protocol/frame.c -lm -o build/fuzz_frame
 *   build/fuzz_frame -max_total_time=30 -max_len=4096
 */
#include <stdint.h>
#include <stdlib.h>

#include "../../protocol/moe_frame.h"

#define FUZZ_MAX_FRAME (64u * 1024u)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    unsigned split_a = data[0] % 61 + 1, split_b = data[1] % 13 + 1;
    data += 2, size -= 2;
    moe_frame_parser_t parser;
    moe_frame_parser_init(&parser, FUZZ_MAX_FRAME);
    size_t off = 0;
    int turn = 0;
    while (off < size) {
        size_t chunk = turn++ % 2 ? split_b : split_a;
        if (chunk > size - off) chunk = size - off;
        size_t pos = 0;
        while (pos < chunk) {
            size_t consumed = 0;
            moe_frame_header_t h;
            uint8_t *payload = NULL;
            moe_parse_result_t r =
                moe_frame_parse(&parser, data + off + pos, chunk - pos, &consumed, &h, &payload);
            if (consumed > chunk - pos) abort();
            if (r == MOE_PARSE_ERROR) goto done;
            if (r == MOE_PARSE_NEED_MORE && consumed != chunk - pos) abort();
            if (r == MOE_PARSE_FRAME) {
                if (h.payload_len + MOE_FRAME_HEADER_SIZE > FUZZ_MAX_FRAME) abort();
                if ((payload != NULL) != (h.payload_len > 0)) abort();
                /* touch every byte so ASan checks the allocation's size */
                volatile uint8_t sink = 0;
                for (uint64_t i = 0; i < h.payload_len; i++) sink ^= payload[i];
                (void)sink;
                free(payload);
            }
            pos += consumed;
        }
        off += chunk;
    }
done:
    moe_frame_parser_reset(&parser);
    return 0;
}
