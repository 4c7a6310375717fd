"""Test-wide setup: one OpenMP thread per process, set before torch is imported.

Forked distributed workers inherit this process's OpenMP runtime; with more threads
idle ones spin and steal the other ranks' cores.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
