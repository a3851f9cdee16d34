# eventually SECONDS WHAT COMMAND...: COMMAND succeeds within SECONDS (tried every second), else
# `fail "WHAT (not within SECONDS)"`. Sourced by the end-to-end scripts, which define `fail`.
eventually() {
  local bound=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$bound" ] || fail "$what (not within ${bound}s)"
    sleep 1
  done
}
