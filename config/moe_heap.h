/* moe_heap: how the process's allocator treats large buffers. */
#ifndef MOE_HEAP_H
#define MOE_HEAP_H

/* Large buffers (a request's activations: 8 MiB of float32 for 1024 tokens
 * of H = 2048) from the heap and kept there for the next request, instead
 * of glibc's default of a fresh mmap for each, whose pages fault in (and
 * are zeroed) on every request and go back to the kernel on every free.
 * Measured on a GPU host (README, "Serving on a GPU"). Memory a burst used
 * stays with the process (up to 1 GiB free at the top of the heap before it
 * is trimmed). Buffers over 64 MiB made by a thread other than main (the
 * I/O thread's for a request of more than 8192 tokens of H = 2048 in
 * float32) still get their own mapping: glibc's thread arenas grow in
 * heaps of at most 64 MiB and map larger blocks whatever M_MMAP_MAX says
 * (seen on glibc 2.36). A no-op off
 * glibc, and with MOE_MALLOC_DEFAULT set in the environment. Call first
 * thing in main, before any thread starts. */
void moe_heap_keep_large_buffers(void);

#endif
