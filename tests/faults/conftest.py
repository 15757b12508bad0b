"""Fault-injection suite: each test breaks a real service the way an operator's day does (a broker
restart, a catalog or sink outage, a full disk, a crash, a hostile upload) and asserts the figures:
rows in == rows out, no duplicates where the sink promises none, no dead letters for a transient
fault, the time to recover, and that a process told to stop stops within its grace period.

Servers come from tests/services/restartable.py (same port and data across a restart)."""
