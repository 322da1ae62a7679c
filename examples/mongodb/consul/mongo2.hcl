node_name = "mongo2"

# Passing only while this member is PRIMARY or SECONDARY (bootstrap.py check: 0 passing, 1 warning, 2 critical),
# so bootstrap.py's peer lookup (/v1/health/service/mongodb?passing) finds exactly the members of the replica set.
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
