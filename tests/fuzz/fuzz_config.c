/* fuzz_config: libFuzzer harness for the YAML config loader (DESIGN §11).
 * The input is handed to moe_config_load_string as a whole file: libyaml
 * parses it, the field table's setters check types and bounds, then model
 * resolution and the cross-field checks run. Invariants (abort on
 * violation): the loader returns MOE_OK or MOE_ERR_CONFIG/MOE_ERR_NOMEM,
 * MOE_ERR_CONFIG comes with at least one message, the error count stays
 * within the array and every message is NUL-terminated; an accepted config
 * must dump to JSON. ASan/UBSan/LSan check the rest, libFuzzer's -timeout
 * catches hangs (aliases, deep nesting).
 *
 * Built and run by `make fuzz` (not part of `make test`). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../config/moe_config.h"
#include "../../config/moe_log.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    /* rejected inputs are the normal case: keep the loader's warnings quiet */
    moe_log_set_level(MOE_LOG_ERROR);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* static: a moe_config_t is tens of KiB (eplb.placement) */
    static moe_config_t cfg;
    static moe_config_errors_t errs;
    memset(&errs, 0xa5, sizeof errs); /* poison: the loader must set count */
    moe_err_t ret = moe_config_load_string((const char *)data, size, "fuzz.yaml", &cfg, &errs);
    if (ret != MOE_OK && ret != MOE_ERR_CONFIG && ret != MOE_ERR_NOMEM) abort();
    if (errs.count < 0 || errs.count > MOE_CONFIG_MAX_ERRORS) abort();
    if (ret == MOE_ERR_CONFIG && errs.count == 0) abort();
    for (int i = 0; i < errs.count; i++)
        if (memchr(errs.messages[i], '\0', sizeof errs.messages[i]) == NULL) abort();
    if (ret == MOE_OK) {
        char *json = moe_config_to_json(&cfg);
        if (json == NULL) abort();
        free(json);
    }
    return 0;
}
