"""schemathesis against the live server's own OpenAPI schema (bounded): no 5xx, every response
(errors included) conforms to the schema, and the bearer auth the schema declares is enforced.

Every default check runs but `positive_data_acceptance`: a schema-valid request may still be
refused on meaning (an empty model reference, a model that is not served, a body that is not a tar
archive) with a documented 4xx and a stable code, which that check counts as a failure.

The server runs in uvicorn on 127.0.0.1 with auth on, fake models, and an admin key, so every
route is reached past authentication.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model
from moorage.security.keys import KeyStore

from tests.support import serve_in_thread

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from moorage.server import create_app

    tmp = tmp_path_factory.mktemp("fuzz")
    environ = {"MOORAGE_HOME": str(tmp / "home"), "MOORAGE_SECURITY__AUDIT_FLUSH_MS": "50"}
    environ["MOORAGE_CONFIG__HOLD_S"] = "0.2"  # the config watch long-polls: a fuzzed one must not hold 25 s
    config = load_settings(environ=environ)
    registry = Registry.from_settings(config)
    for task, name in (("embed", "emb"), ("classify", "cls"), ("generate", "gen")):
        registry.register(make_fake_model(tmp / name, task), name, task, alias="production")
    key = KeyStore(registry.catalog).create("admin", name="fuzz")[1]
    app = create_app(config, ["emb@production", "cls", "gen"], registry=registry)
    with serve_in_thread(app) as url:
        yield {"url": url, "key": key, "schema": app.openapi(), "registry": registry}
    registry.close()


def test_no_server_error_and_every_response_fits_the_schema(live):
    from hypothesis import given

    schema = schemathesis.openapi.from_dict(live["schema"])
    headers = {"Authorization": f"Bearer {live['key']}"}
    failures, tested = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=live["url"], headers=headers, excluded_checks=[positive_data_acceptance])

        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - schemathesis raises a FailureGroup; every operation is fuzzed
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
        tested.append(operation.label)
    assert len(tested) == sum(len(ops) for ops in live["schema"]["paths"].values())
    assert not failures, "\n\n".join(failures)


def test_the_fuzzing_left_the_audit_chain_intact(live):
    from moorage.security.audit import AuditLog

    # the server may still be writing audit rows: verify checks the chain up to the head it read first
    count, problems = AuditLog(live["registry"].catalog).verify()
    assert problems == [] and count > 0
