/* control: the JSON control channel on rank 0 (DESIGN §8; the reference is
 * protocol/PROTOCOL.md). One newline-delimited JSON request per line, one
 * reply per request; `reload` replies once every rank applied the config;
 * `subscribe` pushes `stats` events. Commands are rows of a table. */
#include <stdlib.h>
#include <string.h>

#include "../config/moe_log.h"
#include "server_internal.h"

typedef struct {
    moe_conn_t *conn;
    cJSON *request;
    cJSON *id;
    cJSON *result;     /* set by a command on success */
    const char *code;  /* set by a command on failure */
    char message[1024];
    bool deferred;     /* the reply comes later (reload) */
} command_t;

typedef void (*command_fn)(command_t *cmd);

static void fail(command_t *cmd, const char *code, const char *fmt, const char *arg) {
    cmd->code = code;
    snprintf(cmd->message, sizeof cmd->message, fmt, arg != NULL ? arg : "");
}

static moe_daemon_t *daemon_of(command_t *cmd) { return cmd->conn->server->daemon; }

static void cmd_health(command_t *cmd) {
    moe_daemon_t *d = daemon_of(cmd);
    double now = moe_now(), oldest = d->oldest_queued, last = d->last_step_done;
    double stall = d->io_cfg.scheduler.stall_timeout_ms / 1e3;
    int queued = atomic_load(&d->queued_requests);
    bool stalled = queued > 0 && oldest > 0 && now - oldest > stall && now - (last > 0 ? last : d->started) > stall;
    cmd->result = cJSON_CreateObject();
    cJSON_AddStringToObject(cmd->result, "status", stalled ? "stalled" : atomic_load(&d->draining) ? "draining" : "ok");
    cJSON_AddNumberToObject(cmd->result, "step", (double)atomic_load(&d->step));
    cJSON_AddNumberToObject(cmd->result, "oldest_queued_ms", oldest > 0 ? (now - oldest) * 1e3 : 0);
    cJSON_AddNumberToObject(cmd->result, "queued_requests", queued);
    cJSON_AddNumberToObject(cmd->result, "ranks", d->ep.size);
    cJSON_AddNumberToObject(cmd->result, "uptime_s", now - d->started);
}

static void cmd_version(command_t *cmd) {
    moe_daemon_t *d = daemon_of(cmd);
    cmd->result = cJSON_CreateObject();
    cJSON_AddStringToObject(cmd->result, "version", MOED_VERSION);
    cJSON_AddNumberToObject(cmd->result, "protocol", MOE_FRAME_VERSION);
    cJSON_AddStringToObject(cmd->result, "backend", moe_backend_name(d->io_cfg.moe.backend));
    cJSON_AddNumberToObject(cmd->result, "ranks", d->ep.size);
}

static void cmd_config(command_t *cmd) {
    moe_server_t *server = cmd->conn->server;
    moe_daemon_t *d = server->daemon;
    char *text = moe_config_to_json(&d->io_cfg);
    cJSON *config = text != NULL ? cJSON_Parse(text) : NULL;
    free(text);
    if (config == NULL) {
        fail(cmd, "internal", "cannot render the config%s", NULL);
        return;
    }
    cmd->result = cJSON_CreateObject();
    cJSON_AddNumberToObject(cmd->result, "epoch", server->applied_epoch);
    cJSON_AddStringToObject(cmd->result, "path", d->io_cfg.source_path);
    cJSON_AddItemToObject(cmd->result, "config", config);
    cJSON *last = cJSON_AddObjectToObject(cmd->result, "last_reload");
    cJSON_AddBoolToObject(last, "ok", server->last_reload_ok);
    cJSON_AddStringToObject(last, "message", server->last_reload);
    cJSON_AddNumberToObject(last, "epoch", server->last_reload_epoch);
    cJSON_AddNumberToObject(last, "step", (double)server->last_reload_step);
}

cJSON *moe_control_stats(moe_server_t *server, int layer) {
    moe_daemon_t *d = server->daemon;
    double now = moe_now();
    long long step = atomic_load(&d->step);
    cJSON *stats = moe_stats_json(&d->stats, now, step, layer);
    if (stats == NULL) return NULL;
    cJSON_AddNumberToObject(stats, "step", (double)step);
    cJSON_AddNumberToObject(stats, "uptime_s", now - d->started);
    cJSON_AddNumberToObject(stats, "config_epoch", server->applied_epoch);
    cJSON_AddBoolToObject(stats, "draining", atomic_load(&d->draining) != 0);
    cJSON_AddNumberToObject(stats, "ranks", d->ep.size);
    cJSON *requests = cJSON_GetObjectItem(stats, "requests");
    cJSON_AddNumberToObject(requests, "queued_tokens", (double)atomic_load(&d->cluster_pending));
    return stats;
}

static bool int_arg(command_t *cmd, const char *name, int min, int max, int *value) {
    cJSON *item = cJSON_GetObjectItem(cmd->request, name);
    if (item == NULL) return true;
    if (!cJSON_IsNumber(item) || item->valuedouble < min || item->valuedouble > max ||
        item->valuedouble != (double)(int)item->valuedouble) {
        char text[160];
        snprintf(text, sizeof text, "'%s' must be an integer in [%d, %d]", name, min, max);
        fail(cmd, "bad_request", "%s", text);
        return false;
    }
    *value = item->valueint;
    return true;
}

static void cmd_stats(command_t *cmd) {
    int layer = -1;
    if (!int_arg(cmd, "layer", 0, 1 << 30, &layer)) return;
    cmd->result = moe_control_stats(cmd->conn->server, layer);
    if (cmd->result == NULL) fail(cmd, "internal", "out of memory%s", NULL);
}

static void on_subscribe_timer(uv_timer_t *timer) {
    moe_conn_t *conn = timer->data;
    if (conn->closing) return;
    cJSON *event = cJSON_CreateObject();
    cJSON_AddStringToObject(event, "event", "stats");
    cJSON *stats = moe_control_stats(conn->server, -1);
    if (stats != NULL) cJSON_AddItemToObject(event, "result", stats);
    moe_conn_write_json(conn, event);
}

static void cmd_subscribe(command_t *cmd) {
    int interval = 1000;
    if (!int_arg(cmd, "interval_ms", 100, 60000, &interval)) return;
    moe_conn_t *conn = cmd->conn;
    if (!conn->timer_started) {
        uv_timer_init(conn->server->loop, &conn->subscribe_timer);
        conn->subscribe_timer.data = conn;
        conn->timer_started = true;
    }
    conn->subscribe_ms = interval;
    uv_timer_start(&conn->subscribe_timer, on_subscribe_timer, (uint64_t)interval, (uint64_t)interval);
    cmd->result = cJSON_CreateObject();
    cJSON_AddTrueToObject(cmd->result, "subscribed");
    cJSON_AddNumberToObject(cmd->result, "interval_ms", interval);
}

static void cmd_unsubscribe(command_t *cmd) {
    if (cmd->conn->timer_started) uv_timer_stop(&cmd->conn->subscribe_timer);
    cmd->result = cJSON_CreateObject();
    cJSON_AddFalseToObject(cmd->result, "subscribed");
}

cJSON *moe_control_start_reload(moe_server_t *server, const char *path, uint64_t conn_id, cJSON *id) {
    moe_daemon_t *d = server->daemon;
    const char *file = path[0] != '\0' ? path : d->config_path;
    cJSON *error = cJSON_CreateObject();
    moe_config_t *next = malloc(sizeof *next);
    moe_config_errors_t *errs = malloc(sizeof *errs);
    char message[4096] = "";
    const char *code = NULL;
    if (next == NULL || errs == NULL) {
        code = "internal";
        snprintf(message, sizeof message, "out of memory");
    } else if (moe_config_load(file, next, errs) != MOE_OK) {
        code = "invalid_config";
        size_t n = 0;
        for (int i = 0; i < errs->count && n + 2 < sizeof message; i++)
            n += (size_t)snprintf(message + n, sizeof message - n, "%s%s", i ? "; " : "", errs->messages[i]);
    } else {
        char fields[1024] = "";
        int count = moe_config_nonreloadable_diff(&d->io_cfg, next, fields, sizeof fields);
        if (count > 0) {
            code = "not_reloadable";
            snprintf(message, sizeof message, "%s: these fields cannot change while running (restart instead): %s",
                     file, fields);
        }
    }
    if (code == NULL) {
        pthread_mutex_lock(&d->reload_lock);
        if (d->pending_config != NULL || server->n_reloads == MOE_MAX_PENDING_RELOADS) {
            code = "busy";
            snprintf(message, sizeof message, "a reload is already being applied; try again");
        } else {
            int epoch = ++server->next_epoch;
            d->pending_config = next;
            d->pending_epoch = epoch;
            next = NULL;
            if (conn_id != 0)
                server->reloads[server->n_reloads++] = (moe_pending_reload_t){conn_id, cJSON_Duplicate(id, 1), epoch};
            moe_log(MOE_LOG_INFO, "reload", "%s validated as epoch %d; applying at the next step boundary", file, epoch);
        }
        pthread_mutex_unlock(&d->reload_lock);
    }
    free(next);
    free(errs);
    if (code == NULL) {
        cJSON_Delete(error);
        return NULL;
    }
    moe_log(MOE_LOG_WARN, "reload", "rejected, the running config stays: %s", message);
    server->last_reload_ok = false;
    snprintf(server->last_reload, sizeof server->last_reload, "%.500s", message);
    cJSON_AddStringToObject(error, "code", code);
    cJSON_AddStringToObject(error, "message", message);
    return error;
}

void moe_control_reload_done(moe_server_t *server, const moe_event_t *event) {
    server->applied_epoch = event->epoch;
    server->last_reload_ok = event->ok;
    server->last_reload_epoch = event->epoch;
    server->last_reload_step = event->step;
    snprintf(server->last_reload, sizeof server->last_reload, "epoch %d from %.400s applied at step %lld",
             event->epoch, event->config->source_path, event->step);
    int kept = 0;
    for (int i = 0; i < server->n_reloads; i++) {
        moe_pending_reload_t *p = &server->reloads[i];
        if (p->epoch > event->epoch) {
            server->reloads[kept++] = *p;
            continue;
        }
        moe_conn_t *conn = moe_server_find_conn(server, p->conn_id);
        if (conn != NULL) {
            cJSON *reply = cJSON_CreateObject();
            cJSON_AddItemToObject(reply, "id", p->id);
            cJSON_AddTrueToObject(reply, "ok");
            cJSON *result = cJSON_AddObjectToObject(reply, "result");
            cJSON_AddNumberToObject(result, "epoch", event->epoch);
            cJSON_AddNumberToObject(result, "step", (double)event->step);
            moe_conn_write_json(conn, reply);
        } else {
            cJSON_Delete(p->id);
        }
    }
    server->n_reloads = kept;
}

static void cmd_reload(command_t *cmd) {
    cJSON *path = cJSON_GetObjectItem(cmd->request, "path");
    if (path != NULL && !cJSON_IsString(path)) {
        fail(cmd, "bad_request", "'path' must be a string%s", NULL);
        return;
    }
    cJSON *error = moe_control_start_reload(cmd->conn->server, path != NULL ? path->valuestring : "", cmd->conn->id,
                                            cmd->id);
    if (error == NULL) {
        cmd->deferred = true;
        return;
    }
    static char code[32];
    snprintf(code, sizeof code, "%s", cJSON_GetObjectItem(error, "code")->valuestring);
    fail(cmd, code, "%s", cJSON_GetObjectItem(error, "message")->valuestring);
    cJSON_Delete(error);
}

static void cmd_rebalance(command_t *cmd) {
    moe_daemon_t *d = daemon_of(cmd);
    const moe_eplb_config_t *eplb = &d->io_cfg.eplb;
    if (eplb->mode == MOE_EPLB_OFF) {
        fail(cmd, "eplb_off", "EPLB is off (eplb.mode: off): every expert has one fixed slot; set eplb.mode to "
                              "online to rebalance%s", NULL);
        return;
    }
    if (eplb->mode == MOE_EPLB_STATIC) {
        fail(cmd, "eplb_static", "eplb.mode is static: the placement comes from the config; set eplb.mode online "
                                 "(restart) to rebalance%s", NULL);
        return;
    }
    int layer = -1;
    if (!int_arg(cmd, "layer", 0, 1 << 30, &layer)) return;
    bool served = layer < 0;
    for (int i = 0; i < d->io_cfg.model.n_layers && !served; i++) served = d->io_cfg.model.layer_ids[i] == layer;
    if (!served) {
        char text[64];
        snprintf(text, sizeof text, "%d", layer);
        fail(cmd, "bad_request", "layer %s is not served", text);
        return;
    }
    /* taken by the step loop at the next boundary, on every rank */
    atomic_store(&d->rebalance_requested, layer < 0 ? -1 : layer + 1);
    cmd->result = cJSON_CreateObject();
    cJSON_AddTrueToObject(cmd->result, "scheduled");
    if (layer < 0) cJSON_AddStringToObject(cmd->result, "layers", "all");
    else cJSON_AddNumberToObject(cmd->result, "layer", layer);
    cJSON_AddNumberToObject(cmd->result, "after_step", (double)atomic_load(&d->step));
}

static void cmd_drain(command_t *cmd) {
    moe_daemon_t *d = daemon_of(cmd);
    moe_server_request_drain(d, false);
    cmd->result = cJSON_CreateObject();
    cJSON_AddTrueToObject(cmd->result, "draining");
    cJSON_AddNumberToObject(cmd->result, "queued_requests", atomic_load(&d->queued_requests));
}

static void cmd_shutdown(command_t *cmd) {
    moe_server_request_drain(daemon_of(cmd), true);
    cmd->result = cJSON_CreateObject();
    cJSON_AddTrueToObject(cmd->result, "shutting_down");
}

static const struct {
    const char *name;
    command_fn fn;
    bool needs_token;
} commands[] = {
    {"health", cmd_health, false},       {"version", cmd_version, false},
    {"config", cmd_config, false},       {"stats", cmd_stats, false},
    {"subscribe", cmd_subscribe, false}, {"unsubscribe", cmd_unsubscribe, false},
    {"reload", cmd_reload, true},        {"rebalance", cmd_rebalance, true},
    {"drain", cmd_drain, true},          {"shutdown", cmd_shutdown, true},
};

void moe_control_on_line(moe_conn_t *conn, char *line) {
    size_t len = strlen(line);
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ')) line[--len] = '\0';
    if (len == 0) return;
    command_t cmd = {0};
    cmd.conn = conn;
    cmd.request = cJSON_ParseWithLength(line, len);
    cmd.id = cmd.request != NULL ? cJSON_GetObjectItem(cmd.request, "id") : NULL;
    cJSON *name = cmd.request != NULL ? cJSON_GetObjectItem(cmd.request, "cmd") : NULL;
    if (cmd.request == NULL || !cJSON_IsObject(cmd.request)) {
        fail(&cmd, "bad_request", "not a JSON object%s", NULL);
    } else if (!cJSON_IsString(name)) {
        fail(&cmd, "bad_request", "no \"cmd\" string%s", NULL);
    } else {
        size_t i = 0, n = sizeof commands / sizeof commands[0];
        while (i < n && strcmp(commands[i].name, name->valuestring) != 0) i++;
        if (i == n) {
            fail(&cmd, "unknown_command",
                 "unknown command '%s' (health, version, config, stats, subscribe, unsubscribe, reload, "
                 "rebalance, drain, shutdown)", name->valuestring);
        } else {
            const char *token = conn->server->token;
            cJSON *given = cJSON_GetObjectItem(cmd.request, "token");
            if (commands[i].needs_token && token[0] != '\0' &&
                (!cJSON_IsString(given) || strcmp(given->valuestring, token) != 0)) {
                fail(&cmd, "unauthorized", "'%s' needs the control token (serve.token_file)", commands[i].name);
                moe_log(MOE_LOG_WARN, "control", "connection %llu: '%s' refused: bad or missing token",
                        (unsigned long long)conn->id, commands[i].name);
            } else {
                commands[i].fn(&cmd);
            }
        }
    }
    if (!cmd.deferred) {
        cJSON *reply = cJSON_CreateObject();
        cJSON_AddItemToObject(reply, "id", cmd.id != NULL ? cJSON_Duplicate(cmd.id, 1) : cJSON_CreateNull());
        if (cmd.code == NULL) {
            cJSON_AddTrueToObject(reply, "ok");
            cJSON_AddItemToObject(reply, "result", cmd.result != NULL ? cmd.result : cJSON_CreateObject());
        } else {
            cJSON_Delete(cmd.result);
            cJSON_AddFalseToObject(reply, "ok");
            cJSON *error = cJSON_AddObjectToObject(reply, "error");
            cJSON_AddStringToObject(error, "code", cmd.code);
            cJSON_AddStringToObject(error, "message", cmd.message);
        }
        moe_conn_write_json(conn, reply);
    }
    cJSON_Delete(cmd.request);
}
