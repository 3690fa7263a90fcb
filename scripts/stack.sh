#!/usr/bin/env bash
# The local real-service stack: ClickHouse (Debian's 18.16), Redis and a Kafka-protocol
# broker (tansu 0.6.0), on loopback and on the project's own ports, with all state and
# logs under $ROOT/.stack/. There is no Docker engine on the dev/CI machines, hence this.
#
#   scripts/stack.sh install          install what is missing (apt packages, tansu build)
#   scripts/stack.sh up               start what is not running (idempotent)
#   scripts/stack.sh down [--wipe]    stop what runs; data stays unless --wipe
#   scripts/stack.sh wipe             stop everything and delete .stack/
#   scripts/stack.sh status           which services answer; exit 1 if any does not
#   scripts/stack.sh logs SVC [-f]    show a service's log (clickhouse, redis, kafka)
#
# Environment: TALLY_CH_HTTP_PORT (18123), TALLY_CH_TCP_PORT (19000),
# TALLY_CH_INTERSERVER_PORT (19009), TALLY_REDIS_PORT (16379), TALLY_KAFKA_PORT (19092),
# TALLY_CACHE (~/.cache/tally), TALLY_TANSU_BIN (a tansu 0.6.0 binary to use instead of the
# cached build), TALLY_STACK_START_TIMEOUT (30 s), TALLY_STACK_STOP_TIMEOUT (20 s).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$ROOT/.stack"
HOST=127.0.0.1

CH_HTTP_PORT="${TALLY_CH_HTTP_PORT:-18123}"
CH_TCP_PORT="${TALLY_CH_TCP_PORT:-19000}"
CH_INTERSERVER_PORT="${TALLY_CH_INTERSERVER_PORT:-19009}"
REDIS_PORT="${TALLY_REDIS_PORT:-16379}"
KAFKA_PORT="${TALLY_KAFKA_PORT:-19092}"

TANSU_VERSION=0.6.0
TALLY_CACHE="${TALLY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tally}"
TANSU_ROOT="$TALLY_CACHE/tansu-$TANSU_VERSION"
TANSU_CACHED="$TANSU_ROOT/bin/tansu"
TANSU="${TALLY_TANSU_BIN:-$TANSU_CACHED}"

START_TIMEOUT="${TALLY_STACK_START_TIMEOUT:-30}"
STOP_TIMEOUT="${TALLY_STACK_STOP_TIMEOUT:-20}"

for port in "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT" "$REDIS_PORT" "$KAFKA_PORT"; do
    if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || ((port == 0 || port > 65535)); then
        echo "stack: not a port number: '$port' (check the TALLY_*_PORT variables)" >&2
        exit 2
    fi
done

SERVICES=(clickhouse redis kafka)
APT_PACKAGES=(clickhouse-server clickhouse-client redis-server tzdata)

say() { printf '%s\n' "$*"; }
warn() { printf 'stack: %s\n' "$*" >&2; }
die() {
    warn "$*"
    exit 1
}

# --- per-service facts ----------------------------------------------------------------

svc_dir() { printf '%s/%s' "$STACK" "$1"; }
pid_file() { printf '%s/%s.pid' "$(svc_dir "$1")" "$1"; }

# The log(s) worth reading when a service misbehaves, most telling first.
svc_logs() {
    local d
    d="$(svc_dir "$1")"
    case "$1" in
    clickhouse) printf '%s\n' "$d/log/clickhouse-server.err.log" "$d/log/clickhouse-server.log" "$d/stdout.log" ;;
    redis) printf '%s\n' "$d/redis.log" "$d/stdout.log" ;;
    kafka) printf '%s\n' "$d/tansu.log" ;;
    esac
}

svc_address() {
    case "$1" in
    clickhouse) printf 'http://%s:%s (native %s, interserver %s)' "$HOST" "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT" ;;
    redis) printf 'redis://%s:%s' "$HOST" "$REDIS_PORT" ;;
    kafka) printf '%s:%s' "$HOST" "$KAFKA_PORT" ;;
    esac
}

svc_ports() {
    case "$1" in
    clickhouse) printf '%s\n' "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT" ;;
    redis) printf '%s\n' "$REDIS_PORT" ;;
    kafka) printf '%s\n' "$KAFKA_PORT" ;;
    esac
}

# What the process's command line must contain, so a recycled pid is not taken for ours.
# (redis-server rewrites its title to "redis-server 127.0.0.1:PORT".)
svc_cmd_pattern() {
    case "$1" in
    clickhouse) printf 'clickhouse-server' ;;
    redis) printf 'redis-server' ;;
    kafka) printf 'tansu' ;;
    esac
}

# Succeeds when the service answers a real request, not merely when its port is open.
svc_probe() {
    case "$1" in
    clickhouse) [[ "$(curl -fsS --max-time 2 "http://$HOST:$CH_HTTP_PORT/?query=SELECT%201" 2>/dev/null)" == 1 ]] ;;
    redis) [[ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] ;;
    kafka) python3 "$ROOT/scripts/kafka_probe.py" --quiet --timeout 2 "$HOST:$KAFKA_PORT" 2>/dev/null ;;
    esac
}

# --- processes ------------------------------------------------------------------------

# Alive and not a zombie: a process this shell killed stays a zombie until reaped.
process_alive() {
    local pid="$1" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# Prints the service's pid if its pid file names a live process of the right kind;
# a stale pid file is removed.
running_pid() {
    local svc="$1" file pid
    file="$(pid_file "$svc")"
    [[ -f "$file" ]] || return 1
    pid="$(<"$file")"
    if process_alive "$pid" && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$(svc_cmd_pattern "$svc")"; then
        printf '%s' "$pid"
        return 0
    fi
    rm -f "$file"
    return 1
}

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

show_logs() {
    local svc="$1" lines="${2:-40}" f shown=0
    while read -r f; do
        if [[ -s "$f" ]]; then
            warn "---- last $lines lines of $f ----"
            tail -n "$lines" "$f" >&2
            shown=1
        fi
    done < <(svc_logs "$svc")
    ((shown)) || warn "($svc wrote no log)"
}

# Pids of the service's servers (started by any checkout's stack, which runs each one in its
# state folder) whose working folder has been deleted.
orphan_pids() {
    local pid cwd
    for pid in $(pgrep -f -- "$(svc_cmd_pattern "$1")"); do
        cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null)" || continue
        [[ "$cwd" == *" (deleted)" && "$cwd" == */.stack/"$1"* ]] && printf '%s\n' "$pid"
    done
    return 0
}

# Waits until the service answers; fails early if its process died.
wait_ready() {
    local svc="$1" pid="$2" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        svc_probe "$svc" && return 0
        process_alive "$pid" || {
            warn "$svc (pid $pid) exited during startup"
            return 1
        }
        sleep 0.2
    done
    warn "$svc (pid $pid) did not answer within ${START_TIMEOUT}s"
    return 1
}

stop_pid() {
    local svc="$1" pid="$2" deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM "$pid" 2>/dev/null || true
    while process_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if process_alive "$pid"; then
        warn "$svc (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while process_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        process_alive "$pid" && die "$svc (pid $pid) survives SIGKILL (stuck in the kernel?)"
    fi
    wait "$pid" 2>/dev/null || true # reap it if it is our own child
    rm -f "$(pid_file "$svc")"
}

# --- configuration --------------------------------------------------------------------

write_clickhouse_config() {
    local d
    d="$(svc_dir clickhouse)"
    mkdir -p "$d"/{data,tmp,user_files,format_schemas,log}
    cp /etc/clickhouse-server/users.xml "$d/users.xml"
    # The packaged config with our paths and ports; comments are dropped on the way.
    python3 - /etc/clickhouse-server/config.xml "$d" "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT" "$HOST" <<'PY'
import sys
import xml.etree.ElementTree as ET

src, d, http, tcp, interserver, host = sys.argv[1:]
tree = ET.parse(src)
root = tree.getroot()


def child(parent, tag):
    el = parent.find(tag)  # direct children only: distributed_ddl/path is left alone
    if el is None:
        el = ET.SubElement(parent, tag)
    return el


ours = {"http_port": http, "tcp_port": tcp, "interserver_http_port": interserver}
for el in list(root):
    # Any other listener (https, secure native, mysql, postgresql, grpc, prometheus...)
    # would open a port of its own, often a default one.
    if (el.tag.endswith("_port") and el.tag not in ours) or el.tag in ("listen_host", "prometheus"):
        root.remove(el)
for tag, value in ours.items():
    child(root, tag).text = value
ET.SubElement(root, "listen_host").text = host
child(root, "interserver_http_host").text = host

logger = child(root, "logger")
child(logger, "log").text = f"{d}/log/clickhouse-server.log"
child(logger, "errorlog").text = f"{d}/log/clickhouse-server.err.log"

child(root, "path").text = f"{d}/data/"
child(root, "tmp_path").text = f"{d}/tmp/"
child(root, "user_files_path").text = f"{d}/user_files/"
child(root, "format_schema_path").text = f"{d}/format_schemas/"
child(root, "users_config").text = f"{d}/users.xml"
# Days and hours are UTC in tally; do not inherit the machine's zone.
child(root, "timezone").text = "UTC"

# The sample clusters (test_shard_localhost...) point at the default native port.
remote = root.find("remote_servers")
if remote is not None:
    for port in remote.iter("port"):
        if (port.text or "").strip() == "9000":
            port.text = tcp

# Re-indent what the dropped comments left as blank lines.
for el in root.iter():
    if el.text is not None and not el.text.strip():
        el.text = None
    el.tail = None
if hasattr(ET, "indent"):  # Python 3.9+
    ET.indent(tree, "    ")
tree.write(f"{d}/config.xml", encoding="utf-8", xml_declaration=True)
PY
}

write_redis_config() {
    local d
    d="$(svc_dir redis)"
    mkdir -p "$d"
    cat >"$d/redis.conf" <<EOF
# Generated by scripts/stack.sh on every start; edit the script, not this file.
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize no
logfile "$d/redis.log"
dir "$d"
appendonly yes
appendfsync everysec
save 3600 1 300 100 60 10000
EOF
}

# --- starting -------------------------------------------------------------------------

check_ports_free() {
    local svc="$1" port
    while read -r port; do
        if port_open "$port"; then
            die "$svc: something not started by this stack already listens on $HOST:$port; stop it or choose another port (see the TALLY_*_PORT variables)"
        fi
    done < <(svc_ports "$svc")
}

# Starts the service in the background and sets LAUNCHED_PID. The children must not
# inherit fds 8 and 9: they hold this script's flocks, which would then never be released.
LAUNCHED_PID=""
launch() {
    local svc="$1" d
    d="$(svc_dir "$svc")"
    mkdir -p "$d"
    case "$svc" in
    clickhouse)
        command -v clickhouse-server >/dev/null || die "clickhouse-server is not installed; run: $0 install"
        write_clickhouse_config
        (cd "$d" && exec nohup clickhouse-server --config-file="$d/config.xml" >>"$d/stdout.log" 2>&1 </dev/null) 8>&- 9>&- &
        ;;
    redis)
        command -v redis-server >/dev/null || die "redis-server is not installed; run: $0 install"
        write_redis_config
        (cd "$d" && exec nohup redis-server "$d/redis.conf" >>"$d/stdout.log" 2>&1 </dev/null) 8>&- 9>&- &
        ;;
    kafka)
        tansu_works || die "no working tansu $TANSU_VERSION at $TANSU; run: $0 install"
        # tansu loads a .env from its working directory or any parent (the dotenv crate);
        # an empty one here keeps a .env at the repo root from configuring the broker.
        : >"$d/.env"
        (cd "$d" && NO_COLOR=1 RUST_LOG="${TALLY_TANSU_LOG:-warn}" exec nohup "$TANSU" broker \
            --listener-url "tcp://$HOST:$KAFKA_PORT" \
            --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
            --storage-engine sqlite://tansu.db \
            --silent >>"$d/tansu.log" 2>&1 </dev/null) 8>&- 9>&- &
        ;;
    esac
    LAUNCHED_PID=$!
    printf '%s\n' "$LAUNCHED_PID" >"$(pid_file "$svc")"
}

start_service() {
    local svc="$1" pid
    if pid="$(running_pid "$svc")"; then
        if svc_probe "$svc"; then
            say "$svc: already running (pid $pid) at $(svc_address "$svc")"
            return 0
        fi
        say "$svc: pid $pid runs but does not answer yet; waiting up to ${START_TIMEOUT}s"
        if wait_ready "$svc" "$pid"; then
            say "$svc: running (pid $pid) at $(svc_address "$svc")"
            return 0
        fi
        say "$svc: pid $pid is wedged; restarting it"
        stop_pid "$svc" "$pid"
    elif svc_probe "$svc"; then
        local orphans
        orphans="$(orphan_pids "$svc")"
        if [[ -z "$orphans" ]]; then
            # E.g. CI's fresh clone while the developer's stack still runs on the same ports:
            # the probe spoke the service's own protocol, so it is usable; `down` leaves it be.
            say "$svc: answers at $(svc_address "$svc") but was not started from $STACK; using it as is"
            return 0
        fi
        # Started from a checkout deleted since: it answers, but its state folder is gone
        # (ClickHouse then fails every CREATE DATABASE with "File not found"). Nothing of
        # it can be saved (Redis refuses a clean stop it cannot persist), so kill it.
        for pid in $orphans; do
            say "$svc: pid $pid answers but its folder $(readlink "/proc/$pid/cwd") is gone; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + STOP_TIMEOUT))
            while process_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
            process_alive "$pid" && die "$svc (pid $pid) survives SIGKILL (stuck in the kernel?)"
        done
    fi
    check_ports_free "$svc"
    launch "$svc"
    pid="$LAUNCHED_PID"
    if ! wait_ready "$svc" "$pid"; then
        show_logs "$svc" 40
        process_alive "$pid" && stop_pid "$svc" "$pid"
        rm -f "$(pid_file "$svc")"
        die "$svc failed to start"
    fi
    say "$svc: started (pid $pid) at $(svc_address "$svc")"
}

# --- install --------------------------------------------------------------------------

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

apt_install() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

tansu_works() {
    [[ -x "$TANSU" ]] && "$TANSU" --version 2>/dev/null | grep -qF "$TANSU_VERSION"
}

BUILD_WAIT=3600

# A build started outside this script does not hold our lock; wait for it rather than
# compile the same thing twice.
wait_for_foreign_build() {
    local f cmd pid found deadline=$((SECONDS + BUILD_WAIT))
    while :; do
        found=""
        for f in /proc/[0-9]*/cmdline; do
            cmd="$(tr '\0' ' ' 2>/dev/null <"$f")" || continue
            if [[ "$cmd" == *"cargo install tansu "* && "$cmd" == *"--root $TANSU_ROOT "* ]]; then
                pid="${f#/proc/}"
                found="${pid%/cmdline}"
                break
            fi
        done
        [[ -n "$found" ]] || return 0
        say "tansu: a cargo install into $TANSU_ROOT is already running (pid $found); waiting for it"
        while process_alive "$found"; do
            ((SECONDS < deadline)) || die "tansu: gave up after ${BUILD_WAIT}s waiting for cargo (pid $found)"
            sleep 5
        done
    done
}

install_tansu() {
    if tansu_works; then
        say "tansu: $TANSU works ($("$TANSU" --version 2>&1 | head -n 1))"
        return 0
    fi
    if [[ "$TANSU" != "$TANSU_CACHED" ]]; then
        die "TALLY_TANSU_BIN=$TANSU does not run as tansu $TANSU_VERSION; unset it to use the cached build"
    fi
    mkdir -p "$TALLY_CACHE"
    local lock="$TALLY_CACHE/tansu-$TANSU_VERSION.lock" log="$TALLY_CACHE/tansu-build.log"
    exec 9>"$lock"
    if ! flock -n 9; then
        say "tansu: another process holds $lock (building tansu); waiting for it"
        flock -w "$BUILD_WAIT" 9 || die "tansu: gave up after ${BUILD_WAIT}s waiting for $lock"
    fi
    wait_for_foreign_build
    if ! tansu_works; then
        command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (Debian's cargo is too old for tansu $TANSU_VERSION)"
        apt_install build-essential pkg-config
        local force=()
        # A binary that exists but does not run would make cargo say "already installed".
        [[ -e "$TANSU_CACHED" ]] && force=(--force)
        say "tansu: building $TANSU_VERSION with cargo install; this takes about 9 minutes on 2 cores (log: $log)"
        if ! cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
            --root "$TANSU_ROOT" ${force[@]+"${force[@]}"} >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            die "building tansu failed (full log: $log)"
        fi
        tansu_works || die "tansu was built but '$TANSU --version' does not report $TANSU_VERSION"
    fi
    exec 9>&-
    say "tansu: $TANSU works ($("$TANSU" --version 2>&1 | head -n 1))"
}

cmd_install() {
    local extra=()
    command -v curl >/dev/null || extra+=(curl)
    command -v python3 >/dev/null || extra+=(python3)
    command -v flock >/dev/null || extra+=(util-linux)
    apt_install "${APT_PACKAGES[@]}" ${extra[@]+"${extra[@]}"}
    install_tansu
}

# --- commands -------------------------------------------------------------------------

# One up/down at a time per checkout; a concurrent `up` would start everything twice.
take_stack_lock() {
    mkdir -p "$STACK"
    exec 8>"$STACK/.lock"
    flock -w 300 8 || die "another stack.sh up/down in this checkout has held $STACK/.lock for 5 minutes"
}

cmd_up() {
    take_stack_lock
    local svc
    for svc in "${SERVICES[@]}"; do
        start_service "$svc"
    done
}

cmd_down() {
    local wipe=0
    case "${1:-}" in
    "") ;;
    --wipe) wipe=1 ;;
    *) die "usage: $0 down [--wipe]" ;;
    esac
    [[ -d "$STACK" ]] || {
        say "nothing to stop: $STACK does not exist"
        return 0
    }
    take_stack_lock
    local svc pid i
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        svc="${SERVICES[i]}"
        if pid="$(running_pid "$svc")"; then
            say "$svc: stopping pid $pid"
            stop_pid "$svc" "$pid"
        else
            say "$svc: not running"
        fi
    done
    if ((wipe)); then
        rm -rf "$STACK"
        say "wiped $STACK"
    fi
}

# What the service says about itself once it answers (version, broker metadata).
svc_detail() {
    case "$1" in
    clickhouse) printf 'version %s' "$(curl -fsS --max-time 2 "http://$HOST:$CH_HTTP_PORT/?query=SELECT%20version()" 2>/dev/null || echo '?')" ;;
    redis) printf 'version %s' "$({ timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" info server 2>/dev/null || true; } | tr -d '\r' | sed -n 's/^redis_version://p')" ;;
    kafka) python3 "$ROOT/scripts/kafka_probe.py" --timeout 3 "$HOST:$KAFKA_PORT" 2>&1 || true ;;
    esac
}

cmd_status() {
    local svc pid state down=0 detail
    for svc in "${SERVICES[@]}"; do
        pid="$(running_pid "$svc")" || pid=""
        if svc_probe "$svc"; then
            state="up"
            detail="$(svc_detail "$svc")"
            [[ -n "$pid" ]] || detail="$detail (not started from $STACK)"
        else
            state="DOWN"
            down=1
            if [[ -z "$pid" ]]; then
                detail="not running"
            elif [[ "$svc" == kafka ]]; then
                detail="runs but does not answer: $(svc_detail kafka)"
            else
                detail="runs but does not answer"
            fi
        fi
        printf '%-10s %-4s %-58s %-11s %s\n' "$svc" "$state" "$(svc_address "$svc")" "${pid:+pid $pid}" "$detail"
    done
    return "$down"
}

cmd_logs() {
    local svc="${1:-}" follow=0 f
    case "$svc" in
    clickhouse | ch) svc=clickhouse ;;
    redis) ;;
    kafka | tansu | broker) svc=kafka ;;
    *) die "usage: $0 logs clickhouse|redis|kafka [-f]" ;;
    esac
    [[ "${2:-}" == -f ]] && follow=1
    local files=()
    while read -r f; do
        [[ -e "$f" ]] && files+=("$f")
    done < <(svc_logs "$svc")
    ((${#files[@]})) || die "$svc has no log yet under $(svc_dir "$svc")"
    if ((follow)); then
        exec tail -n 50 -F "${files[@]}"
    fi
    tail -n "${TALLY_LOG_LINES:-100}" "${files[@]}"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
    install) cmd_install "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    wipe) cmd_down --wipe ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
