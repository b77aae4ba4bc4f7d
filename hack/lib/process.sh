# shellcheck shell=bash
# What the hack/ scripts share about the servers they start.

# alive PID: the process runs and is not a zombie. The servers the scripts start are reparented
# to init when their starter exits, and init may reap them a second or two after they exit:
# `kill -0` still succeeds on them meanwhile, although they hold no port any more.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}
