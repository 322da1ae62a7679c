"""A critical-section child for exclusion tests: logs its interval, optionally waits to see peers inside.

usage: cs_child.py LOG HOLD_SECONDS [WANT_PEERS]
Appends "S <ns> <pid>" and "E <ns> <pid>" to LOG. With WANT_PEERS, stays inside until that many processes are
inside at once (counted in LOG.count under flock) or HOLD_SECONDS pass, so a semaphore's limit is reached
deterministically instead of by luck.
"""

import fcntl
import os
import sys
import time


def bump(path, delta):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + delta
        f.seek(0)
        f.truncate()
        f.write(str(n))
        return n


def main():
    log, hold = sys.argv[1], float(sys.argv[2])
    want = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with open(log, "a") as f:
        f.write(f"S {time.time_ns()} {os.getpid()}\n")
    if want:
        bump(log + ".count", 1)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            with open(log + ".count") as f:
                if int(f.read() or 0) >= want:
                    break
            time.sleep(0.005)
        time.sleep(0.05)  # let the last peer see the count too
        bump(log + ".count", -1)
    else:
        time.sleep(hold)
    with open(log, "a") as f:
        f.write(f"E {time.time_ns()} {os.getpid()}\n")


if __name__ == "__main__":
    main()
