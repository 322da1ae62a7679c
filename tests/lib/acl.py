"""An ACL agent (default deny), tokens made from policy rules, and lock holders made by hand.

hold_key() takes a lock key with a session of its own, as another tool would. Consul 1.8 grants reading a session
by the node the session belongs to (`session "NODE"` rules); to hold a key with a session that a test's token may
not read, hold_key(node=...) puts the session on a second, catalog-only node: registered through the catalog API
and created with no health checks (a node without an agent has no serfHealth).
"""

import uuid

from lib.consul_agent import Agent

LOCK_FLAG = 0x2DDCCBC058A50C18  # the Flags value of `consul lock` keys (hashicorp/consul api/lock.go)
FOREIGN_NODE = "elsewhere"


def start_acl_agent(name, log_dir):
    """A dev agent with ACLs on and default deny. Its own calls (fixtures) use the management token."""
    master = str(uuid.uuid4())
    config = {
        "primary_datacenter": "dc1",
        "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": master}},
    }
    agent = Agent(name, config=config, log_dir=log_dir)
    agent.token = master
    return agent.start()


def make_token(agent, rules):
    policy = agent.api("PUT", "/v1/acl/policy", {"Name": f"p-{uuid.uuid4().hex[:8]}", "Rules": rules})
    return agent.api("PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})["SecretID"]


def hold_key(agent, key, session_name="other holder", node=None):
    """Take `key` as a lock with a session of our own (lock-delay 0s, so a test frees it at once by destroying
    the session). With `node`, the session belongs to that catalog-only node. Returns the session ID."""
    body = {"Name": session_name, "TTL": "60s", "LockDelay": "0s"}
    if node is not None:
        agent.api("PUT", "/v1/catalog/register", {"Node": node, "Address": "127.0.0.2"})
        body.update(Node=node, Checks=[])
    sid = agent.api("PUT", "/v1/session/create", body)["ID"]
    assert agent.api("PUT", f"/v1/kv/{key}?acquire={sid}&flags={LOCK_FLAG}", b"other") is True
    return sid


def destroy_session(agent, sid):
    agent.api("PUT", f"/v1/session/destroy/{sid}")
