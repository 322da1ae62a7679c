# Consul client agent beside each mongod (same network namespace: it reaches mongod and the bootstrap reaches it
# on 127.0.0.1). The member-specific part (node name, service address) is in mongoN.hcl.
datacenter                 = "dc1"
data_dir                   = "/tmp/consul"
retry_join                 = ["consul"]
client_addr                = "127.0.0.1"
enable_local_script_checks = true
leave_on_terminate         = true
