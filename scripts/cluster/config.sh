# Configuration files of containerd, CNI, kubelet and kube-proxy; sourced by scripts/cluster.sh,
# which sets the paths and addresses used here.

# put FILE: writes stdin to FILE unless FILE has it already (kube-proxy exits when its
# configuration file changes, so a second `up` must leave the files alone).
put() {
  local new
  new=$(cat)
  [ "$new" = "$(cat "$1" 2>/dev/null)" ] || echo "$new" >"$1"
}

write_configs() {
  mkdir -p "$ETC/cni"
  put "$ETC/containerd.toml" <<TOML
version = 2
root = "$DATA/containerd"
state = "$RUN/containerd"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$DATA/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Where CAP_SYS_RESOURCE is withheld (as on these machines), a process cannot lower its
  # oom_score_adj: pods then get at least containerd's instead of the kubelet's -998.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$ETC/cni"
TOML

  # The pods' bridge lives in the cluster's network namespace; no masquerading: pods talk to
  # the node and to each other only.
  put "$ETC/cni/10-hypersdk.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "hypersdk-cluster",
  "plugins": [{
    "type": "bridge", "bridge": "$POD_BRIDGE", "isGateway": true, "ipMasq": false,
    "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$DATA/cni-ipam"}
  }]
}
JSON

  # Disk thresholds are low because the machine's disk is shared and often more than 85% full:
  # eviction or image garbage collection would otherwise remove the imported images.
  put "$ETC/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
podCIDR: $POD_CIDR
failSwapOn: false
resolvConf: /etc/resolv.conf
podLogsDir: $DATA/pod-logs
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
YAML

  # kube-proxy leaves the machine-wide conntrack settings alone and serves node ports on the
  # node's address only.
  put "$ETC/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $ETC/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}
