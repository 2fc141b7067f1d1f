/* moe_heap: large buffers come from the heap and stay there for reuse,
 * unless MOE_MALLOC_DEFAULT keeps glibc's own behaviour (a fresh mapping
 * per large buffer). Each Criterion test runs in its own process, so the
 * allocator settings of one do not reach another. glibc only. */
#include <criterion/criterion.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include "../config/moe_heap.h"

#define LARGE ((size_t)16 << 20) /* 16 MiB: over glibc's default mmap threshold (128 KiB to 32 MiB) */

/* AddressSanitizer (make asan) replaces glibc's allocator: nothing to see */
#if defined(__SANITIZE_ADDRESS__)
#define SKIP_UNDER_ASAN() cr_skip_test("AddressSanitizer's allocator is not glibc's")
#else
#define SKIP_UNDER_ASAN() (void)0
#endif

/* how many blocks glibc holds as their own mappings, and the heap's free bytes */
static size_t mapped_blocks(void) { return mallinfo2().hblks; }
static size_t heap_free_bytes(void) { return mallinfo2().fordblks; }

Test(heap, large_buffers_come_from_the_heap_and_stay, .timeout = 10) {
    SKIP_UNDER_ASAN();
    unsetenv("MOE_MALLOC_DEFAULT");
    moe_heap_keep_large_buffers();
    const size_t mapped = mapped_blocks();
    char *a = malloc(LARGE);
    cr_assert_not_null(a);
    memset(a, 1, LARGE);
    cr_assert_eq(mapped_blocks(), mapped, "a %zu-byte buffer got its own mapping", LARGE);
    free(a);
    cr_assert_geq(heap_free_bytes(), LARGE, "the freed buffer went back to the kernel (heap free %zu bytes)",
                  heap_free_bytes());
    char *b = malloc(LARGE); /* the next request's: from what the first left */
    cr_assert_not_null(b);
    cr_assert_eq(mapped_blocks(), mapped);
    free(b);
}

Test(heap, opt_out_keeps_the_default_mappings, .timeout = 10) {
    SKIP_UNDER_ASAN();
    setenv("MOE_MALLOC_DEFAULT", "1", 1);
    moe_heap_keep_large_buffers();
    const size_t mapped = mapped_blocks();
    char *a = malloc(LARGE);
    cr_assert_not_null(a);
    cr_assert_eq(mapped_blocks(), mapped + 1, "glibc's default maps a %zu-byte buffer on its own", LARGE);
    free(a);
    cr_assert_eq(mapped_blocks(), mapped, "and unmaps it when freed");
}
