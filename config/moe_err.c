/* moe_err: names and descriptions of moe_err_t codes. */
#include "moe_err.h"

#include <stdarg.h>
#include <stdio.h>

const char *moe_err_name(moe_err_t err) {
    switch (err) {
#define MOE_ERR_NAME(name, value, text) \
    case name: return #name;
        MOE_ERR_LIST(MOE_ERR_NAME)
#undef MOE_ERR_NAME
    }
    return "MOE_ERR_UNKNOWN";
}

const char *moe_strerror(moe_err_t err) {
    switch (err) {
#define MOE_ERR_TEXT(name, value, text) \
    case name: return text;
        MOE_ERR_LIST(MOE_ERR_TEXT)
#undef MOE_ERR_TEXT
    }
    return "unknown error";
}

moe_err_t moe_err_fmt(char *buf, size_t size, moe_err_t err, const char *fmt, ...) {
    if (buf != NULL && size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, size, fmt, ap);
        va_end(ap);
    }
    return err;
}
