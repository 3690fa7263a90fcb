#!/usr/bin/env bash
# tally's own services on the local stack, in the background, state and logs under
# .stack/tally/. Binaries come from `cargo build --release` (the Makefile builds them).
#
#   scripts/services.sh up       start what is not running (idempotent; the aggregator
#                                applies the ClickHouse migrations as it starts), and
#                                restart what runs a binary rebuilt since it started, or
#                                started before a migration, the config or a plan changed
#   scripts/services.sh down     SIGTERM (services flush and drain), SIGKILL after a deadline
#   scripts/services.sh status   which services answer /healthz and /readyz
#
# Environment: TALLY_CONFIG (config/tally.dev.toml), CARGO_TARGET_DIR (./target),
# TALLY_SERVICES_START_TIMEOUT (30 s), TALLY_SERVICES_STOP_TIMEOUT (20 s).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.stack/tally"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
export TALLY_CONFIG="${TALLY_CONFIG:-$ROOT/config/tally.dev.toml}"
START_TIMEOUT="${TALLY_SERVICES_START_TIMEOUT:-30}"
STOP_TIMEOUT="${TALLY_SERVICES_STOP_TIMEOUT:-20}"

# name → binary and the address whose /healthz and /readyz it serves.
SERVICES=(collector aggregator quota rater)
declare -A BINARY=([collector]=tally-ingest [aggregator]=tally-aggregator [quota]=tally-quota [rater]=tally-rater)
declare -A ARGS=([collector]="" [aggregator]="run" [quota]="serve" [rater]="--plans $ROOT/config/plans serve")
declare -A ADDR=([collector]=127.0.0.1:8700 [aggregator]=127.0.0.1:8701 [quota]=127.0.0.1:8702 [rater]=127.0.0.1:8703)

pid_of() {
    local f="$STATE/$1.pid" pid
    [[ -f "$f" ]] || return 1
    pid="$(cat "$f")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${BINARY[$1]:0:15}" ]] || return 1
    printf '%s' "$pid"
}

answers() { curl -fsS -m 2 "http://${ADDR[$1]}$2" >/dev/null 2>&1; }

tail_log() {
    echo "---- last lines of $STATE/$1.log ----" >&2
    tail -n 40 "$STATE/$1.log" >&2 || true
}

# SIGTERM (the service flushes and drains), SIGKILL after STOP_TIMEOUT.
stop_one() {
    local svc="$1" pid="$2"
    kill -TERM "$pid"
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "services: $svc did not stop within ${STOP_TIMEOUT}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$STATE/$svc.pid"
}

# Whether the running process is the binary now on disk: a rebuild puts a new file (a new
# inode) where the old one was, and the process keeps running the old one.
current_binary() {
    local svc="$1" pid="$2" running on_disk
    running="$(stat -L -c %d:%i "/proc/$pid/exe" 2>/dev/null)" || return 0
    on_disk="$(stat -L -c %d:%i "$BIN/${BINARY[$svc]}" 2>/dev/null)" || return 0
    [[ "$running" == "$on_disk" ]]
}

# Whether the process started after the newest migration, configuration and plan file:
# services apply migrations and read their config and plans only as they start.
inputs_unchanged() {
    local pid="$1" running_for newest
    running_for="$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')" || return 0
    [[ -n "$running_for" ]] || return 0
    newest="$(find "$ROOT/schemas/clickhouse" "$ROOT/config" "$TALLY_CONFIG" -type f -printf '%T@\n' 2>/dev/null | sort -n | tail -n 1)"
    newest="${newest%.*}"
    [[ -z "$newest" ]] || ((newest <= $(date +%s) - running_for))
}

up() {
    mkdir -p "$STATE"
    for svc in "${SERVICES[@]}"; do
        if pid="$(pid_of "$svc")" && answers "$svc" /healthz; then
            if ! current_binary "$svc" "$pid"; then
                echo "$svc: $BIN/${BINARY[$svc]} was rebuilt since pid $pid started; restarting it"
            elif ! inputs_unchanged "$pid"; then
                echo "$svc: a migration, the config or a plan changed since pid $pid started; restarting it"
            else
                echo "$svc: already running (pid $pid) at http://${ADDR[$svc]}"
                continue
            fi
            stop_one "$svc" "$pid"
        fi
        if answers "$svc" /healthz; then
            echo "services: something else answers on ${ADDR[$svc]}; stop it first" >&2
            exit 1
        fi
        [[ -x "$BIN/${BINARY[$svc]}" ]] || { echo "services: $BIN/${BINARY[$svc]} missing; run make up" >&2; exit 1; }
        # shellcheck disable=SC2086 # ARGS holds whole words
        nohup "$BIN/${BINARY[$svc]}" ${ARGS[$svc]} >>"$STATE/$svc.log" 2>&1 </dev/null &
        echo $! >"$STATE/$svc.pid"
        local deadline=$((SECONDS + START_TIMEOUT))
        until answers "$svc" /readyz; do
            if ! pid_of "$svc" >/dev/null; then
                echo "services: $svc exited during start-up" >&2
                tail_log "$svc"
                exit 1
            fi
            if ((SECONDS > deadline)); then
                echo "services: $svc not ready within ${START_TIMEOUT}s" >&2
                tail_log "$svc"
                exit 1
            fi
            sleep 0.2
        done
        echo "$svc: started (pid $(cat "$STATE/$svc.pid")) at http://${ADDR[$svc]}"
    done
}

down() {
    # In order: the collector stops taking events before the aggregator drains.
    for svc in "${SERVICES[@]}"; do
        local pid
        if ! pid="$(pid_of "$svc")"; then
            rm -f "$STATE/$svc.pid"
            continue
        fi
        stop_one "$svc" "$pid"
        echo "$svc: stopped"
    done
}

status() {
    local bad=0
    for svc in "${SERVICES[@]}"; do
        local state=DOWN
        if answers "$svc" /readyz; then state=ready
        elif answers "$svc" /healthz; then state="up, not ready"; bad=1
        else bad=1
        fi
        printf '%-10s %-14s http://%s\n' "$svc" "$state" "${ADDR[$svc]}"
    done
    return "$bad"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: scripts/services.sh up|down|status" >&2; exit 2 ;;
esac
