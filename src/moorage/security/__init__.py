"""Security: API keys and roles (keys), rate limits (limits), content filters (filters), the
hash-chained audit log (audit) and envelope encryption of artifacts (crypto).

Modules are imported one by one (``from moorage.security import crypto``): the registry uses
`crypto`, and `keys`/`audit` keep their tables in the registry's catalog.
"""
