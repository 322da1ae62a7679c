node_name = "mongo2"

# Passing only while this member is PRIMARY or SECONDARY (bootstrap.py check: 0 passing, 1 warning, 2 critical).
# The check reads `hello`, which needs no credentials although the members run with a keyFile. It is for people,
# dashboards and clients: bootstrap.py itself asks every *registered* instance, whatever its health, because a
# member that is recovering, in an election or failing its check is still a member of the replica set.
service {
  name    = "mongodb"
  id      = "mongodb"
  address = "mongo2"
  port    = 27017
  check {
    id       = "mongodb-member"
    name     = "replica set member state"
    args     = ["python", "/example/bootstrap.py", "check", "--config", "/etc/mongo/mongod.conf"]
    interval = "5s"
    timeout  = "4s"
  }
}
