"""Security: API keys and roles (keys), rate limits (limits), content filters (filters), request
policy (policy) and the hash-chained audit log (audit).

Modules are imported one by one (``from moorage.security import keys``). `keys` and `audit` keep
their tables in the catalog database (`moorage.db`), which they share with the registry without
importing it. Envelope encryption of artifacts belongs to the registry (`moorage.registry.crypto`).
"""
