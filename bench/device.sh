#!/usr/bin/env bash
# The benchmark's 16-core rows, on a machine lent for a few minutes by the session tool
# `device` (a copy of this working tree there; nothing can be fetched there), in one call:
#
#   here:   bash bench/device.sh prepare
#           .device/ (git ignores it): the wheels of moonq and of what it needs, at the
#           versions of this .venv, for the lent machine's Python (PYVER, default 3.12), and
#           this machine's redis-server with every library it loads, its loader included
#   there:  run(command="bash bench/device.sh run", carry=[".device"], timeout_s=540)
#           writes to $OUT: machine.txt, slow.md (10,000 slow streams through one worker and
#           one API), scaling.md (the ceiling row with 1, 4, 8 workers and 4 API processes,
#           then 1, 2, 4 API processes and 8 workers), slow2x2.md (the 10,000 streams through
#           two of each), and the logs
#
# `SMALL=1 bash bench/device.sh run` is the same run at a size for two cores, to try it here
# (after `PYVER=3.11 bash bench/device.sh prepare`).
set -euo pipefail
cd "$(dirname "$0")/.."
here=.device

prepare() {
    local platforms=() tag
    for tag in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    rm -rf "$here" && mkdir -p "$here/whl" "$here/redis/lib"
    .venv/bin/pip freeze --exclude-editable >"$here/constraints.txt"
    .venv/bin/pip wheel -q --no-deps -w "$here/whl" .
    .venv/bin/pip download -q -d "$here/whl" -c "$here/constraints.txt" --only-binary=:all: \
        --python-version "${PYVER:-3.12}" --implementation cp "${platforms[@]}" --platform any .
    local server
    server=$(command -v redis-server)
    cp "$server" "$here/redis/"
    # Every library, the C library and its loader too: the lent machine runs another distribution.
    ldd "$server" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' |
        xargs -I{} cp -L {} "$here/redis/lib/"
    du -sh "$here"
}

run() {
    local out=${OUT:-/tmp/moonq-device} site=/tmp/moonq-site port=6390
    mkdir -p "$out"
    # 10,000 streams hold ~40,000 sockets across the processes: every one may open as many
    # as the machine allows (moonq's own processes raise their soft limit; the load's do not).
    ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$here"/whl/*.whl
    export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
    local lib=$here/redis/lib
    "$lib"/ld-linux-x86-64.so.2 --library-path "$lib" "$here/redis/redis-server" \
        --port "$port" --save '' --appendonly no >"$out/redis.log" 2>&1 &
    redis_pid=$!
    trap 'kill "$redis_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        python3 -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null && break
        sleep 0.2
    done
    {
        echo "nproc $(nproc); $(python3 --version); $(uname -srm)"
        grep -m1 "model name" /proc/cpuinfo || true
        echo "open files $(ulimit -n); somaxconn $(cat /proc/sys/net/core/somaxconn 2>/dev/null)"
        echo "redis $("$lib"/ld-linux-x86-64.so.2 --library-path "$lib" "$here/redis/redis-server" --version)"
    } >"$out/machine.txt"
    cat "$out/machine.txt"

    local url="redis://127.0.0.1:$port/0"
    local scaling=(--scaling 1,4,8 --api-scaling 1,2,4 --api-procs 4 --workers 8 --clients 4
        --fakes 4 --ceiling 800 --ceiling-requests 8000)
    local slow=(--slow 10000 --clients 4 --fakes 2)
    if [ -n "${SMALL:-}" ]; then
        scaling=(--scaling 1,2 --api-scaling 1,2 --api-procs 2 --workers 2 --clients 2
            --fakes 2 --ceiling 100 --ceiling-requests 600)
        slow=(--slow 300 --slow-chunks 5 --slow-delay 0.2 --clients 2 --fakes 2)
    fi
    # Each run on its own, the issue's row first: one that fails or runs out of time leaves
    # the others' tables.
    crowd slow "$url" "$out" "${slow[@]}"
    python3 -m bench.run --redis-url "$url" "${scaling[@]}" --repeat 1 --no-relay \
        --output "$out/scaling.md" >"$out/scaling.log" 2>&1 || echo "scaling: failed"
    tail -n 12 "$out/scaling.md" 2>/dev/null || tail -n 40 "$out/scaling.log"
    # The same crowd with two API processes and two workers: what adding processes does.
    crowd slow2x2 "$url" "$out" "${slow[@]}" --api-procs 2 --workers 2
}

crowd() { # name, Redis URL, $OUT, then bench.run's arguments
    local name=$1 url=$2 out=$3
    shift 3
    python3 -m bench.run --redis-url "$url" "$@" --levels 1 --requests 10 --sequential 0 \
        --ceiling 0 --queued 0 --repeat 1 --chat-level 0 --wait-level 0 \
        --output "$out/$name.md" >"$out/$name.log" 2>&1 || echo "$name: failed"
    tail -n 4 "$out/$name.md" 2>/dev/null || tail -n 40 "$out/$name.log"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*) echo "usage: bash bench/device.sh prepare|run" >&2 && exit 2 ;;
esac
