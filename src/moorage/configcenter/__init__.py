"""The config center: typed, versioned releases of the hot part of the settings tree (drafts,
diffs, approval, publish, rollback, gray release, traffic splits), their store backends (the
catalog database, etcd), and the subscriber that applies a release inside a running process.

Below the edges: the HTTP routes and the CLI call into it; a process hands a validated release to
the engine layer, which swaps its settings atomically.
"""
