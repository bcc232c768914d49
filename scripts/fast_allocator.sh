# Sourced (`. scripts/fast_allocator.sh`) by the training scripts: preload jemalloc, else tcmalloc, when the
# library is installed (apt: libjemalloc2 or libgoogle-perftools4). glibc's allocator hands the pages of
# vocabulary-sized tensors back to the kernel and faults them in again on every step; these keep them.
# Without either library nothing changes. MEGATRON_MALLOC=none keeps glibc's; MEGATRON_MALLOC=/path/to/lib.so
# preloads that file.

megatron_fast_allocator() {
    local choice="${MEGATRON_MALLOC:-auto}" name
    if [ "$choice" = none ]; then
        return 0
    fi
    if [ "$choice" = auto ]; then
        choice=""
        for name in libjemalloc.so.2 libjemalloc.so libtcmalloc_minimal.so.4 libtcmalloc.so.4; do
            choice=$(/sbin/ldconfig -p 2>/dev/null | awk -v name="$name" '$1 == name { print $NF; exit }')
            [ -n "$choice" ] && break
        done
        [ -z "$choice" ] && return 0
    elif [ ! -f "$choice" ]; then
        echo "MEGATRON_MALLOC=$choice: no such file; set it to an allocator's .so, auto or none" >&2
        return 1
    fi
    case ":${LD_PRELOAD:-}:" in
        *":$choice:"*) ;;
        *) export LD_PRELOAD="$choice${LD_PRELOAD:+:$LD_PRELOAD}" ;;
    esac
    echo "allocator: $choice (LD_PRELOAD; MEGATRON_MALLOC=none to keep glibc's)"
}

megatron_fast_allocator
