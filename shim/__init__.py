"""consul-locker: run a command on one machine at a time under a Consul lock, as a correct PID 1.

Importing this package has no side effects; the command-line entry point is :mod:`shim.entry`.
Library use: :func:`shim.lock.held` (a context manager around a block of Python code).
"""

__version__ = "0.1.0"
