"""Shared test helpers (importable by every test module: tests/ is on sys.path via conftest)."""

from conftest import LOCKER, assert_no_session, lock_key, locker_env, sessions_named  # noqa: F401
from consul_agent import Agent, free_port, wait_until  # noqa: F401
