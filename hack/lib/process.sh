# shellcheck shell=bash
# What the hack/ scripts share about the servers they start and how clients reach them.

# alive PID: the process runs and is not a zombie. The servers the scripts start are reparented
# to init when their starter exits, and init may reap them a second or two after they exit:
# `kill -0` still succeeds on them meanwhile, although they hold no port any more.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# write_kubeconfig FILE CLUSTER SERVER CA_FILE CERT_FILE KEY_FILE: a kubeconfig of one cluster
# and context named CLUSTER, and one user (named after CERT_FILE) with that client certificate.
write_kubeconfig() {
  local file=$1 cluster=$2 server=$3 ca=$4 cert=$5 key=$6 user
  user=$(basename "$cert" .crt)
  cat >"$file" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: $cluster
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$ca")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$cert")
    client-key-data: $(base64 -w0 <"$key")
contexts:
- name: $cluster
  context: {cluster: $cluster, user: $user}
current-context: $cluster
KCFG
}
