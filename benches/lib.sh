# Shell helpers shared by the bench scripts (sourced, not run).

# wait_addr STDOUT LOG [SECONDS]: the address a server printed to STDOUT
# ("listening on ADDR"), waiting up to SECONDS (default 10); says where its
# log is if it never did.
wait_addr() {
    local addr= tries=$(( ${3:-10} * 20 ))
    for _ in $(seq "$tries"); do
        addr=$(sed -n 's/^listening on //p' "$1")
        [ -n "$addr" ] && break
        sleep 0.05
    done
    [ -n "$addr" ] || { echo "server did not start; see $2" >&2; return 1; }
    echo "$addr"
}
