/* moe_err: the one error type of moed (STYLE 2).
 *
 * Every function that can fail returns moe_err_t: MOE_OK (0) or a negative
 * code from the X-macro list below. Human context (file, tensor, field path)
 * goes into a caller-supplied message buffer or the log, never into the code.
 * Used by every module; depends on nothing. */
#ifndef MOE_ERR_H
#define MOE_ERR_H

#include <stddef.h>

#define MOE_ERR_LIST(X)                                                   \
    X(MOE_OK, 0, "ok")                                                    \
    X(MOE_ERR_INVAL, -1, "invalid argument")                              \
    X(MOE_ERR_NOMEM, -2, "out of memory")                                 \
    X(MOE_ERR_IO, -3, "I/O error")                                        \
    X(MOE_ERR_CONFIG, -4, "invalid configuration")                        \
    X(MOE_ERR_FORMAT, -5, "malformed file")                               \
    X(MOE_ERR_NOT_FOUND, -6, "not found")                                 \
    X(MOE_ERR_SHAPE, -7, "shape mismatch")                                \
    X(MOE_ERR_MPI, -8, "MPI error")                                       \
    X(MOE_ERR_UNSUPPORTED, -9, "unsupported")                             \
    X(MOE_ERR_RANGE, -10, "value out of range")                           \
    X(MOE_ERR_INTERNAL, -11, "internal error")

typedef enum {
#define MOE_ERR_ENUM(name, value, text) name = value,
    MOE_ERR_LIST(MOE_ERR_ENUM)
#undef MOE_ERR_ENUM
} moe_err_t;

/* Returns the symbolic name ("MOE_ERR_IO") of a code; never NULL. */
const char *moe_err_name(moe_err_t err);
/* Returns a short human description ("I/O error") of a code; never NULL. */
const char *moe_strerror(moe_err_t err);

/* Formats into buf (always NUL-terminated when size > 0) and returns err, so
 * a failure path reads `return moe_err_fmt(buf, n, MOE_ERR_IO, "...", ...);`. */
moe_err_t moe_err_fmt(char *buf, size_t size, moe_err_t err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Evaluate an expression returning moe_err_t; on failure jump to label. */
#define MOE_CHECK_GOTO(expr, ret, label) \
    do {                                 \
        (ret) = (expr);                  \
        if ((ret) != MOE_OK) goto label; \
    } while (0)

#define MOE_CHECK(expr)                     \
    do {                                    \
        moe_err_t moe_check_ret_ = (expr);  \
        if (moe_check_ret_ != MOE_OK) return moe_check_ret_; \
    } while (0)

#endif
