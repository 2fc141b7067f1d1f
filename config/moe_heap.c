/* moe_heap: glibc's allocator tuned for large, repeated buffers (moe_heap.h). */
#include "moe_heap.h"

#include <stdlib.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

void moe_heap_keep_large_buffers(void) {
    if (getenv("MOE_MALLOC_DEFAULT") != NULL) return; /* glibc's own behaviour */
#ifdef __GLIBC__
    mallopt(M_MMAP_MAX, 0);              /* no mmap per large buffer (but see moe_heap.h: over 64 MiB in a thread) */
    mallopt(M_TRIM_THRESHOLD, 1 << 30);  /* return free memory at the top only beyond 1 GiB */
    mallopt(M_TOP_PAD, 64 << 20);        /* grow the heap 64 MiB ahead */
#endif
}
