"""Traffic splits: the sticky bucket router (pure), the pool's resolution of a bare name, and the
HTTP edge answering from both arms of a split."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from pydantic import ValidationError

from moorage.batching.routing import BUCKETS, ROUTE_KEYS, RequestGray, RouteKeys, Router, bucket, lane_of
from moorage.config import RouteSettings, Settings
from moorage.errors import Unprocessable

from tests.support import eventually


def _route(canary: int, sticky: str | None = "api_key") -> Router:
    split = [{"target": "production", "weight": 100 - canary}, {"target": "canary", "weight": canary}]
    return Router.from_settings("emb", RouteSettings.model_validate({"split": split, "sticky": sticky}))


KEYS = [f"key-{i}" for i in range(10_000)]


def _in_canary(router: Router) -> set[str]:
    return {k for k in KEYS if router.pick(RouteKeys(api_key=k)) == "emb@canary"}


# -- the router -------------------------------------------------------------------------------
def test_a_ten_percent_sticky_split_lands_within_one_point_over_ten_thousand_keys():
    canary = _in_canary(_route(10))
    assert abs(len(canary) / len(KEYS) - 0.10) <= 0.01


def test_the_same_key_always_lands_on_the_same_arm():
    router = _route(10)
    for key in KEYS[:200]:
        arms = {router.pick(RouteKeys(api_key=key)) for _ in range(5)}
        assert len(arms) == 1
    # and a rebuilt router (another process, another release) agrees
    again = _route(10)
    assert all(router.pick(RouteKeys(api_key=k)) == again.pick(RouteKeys(api_key=k)) for k in KEYS[:1000])


def test_raising_the_canary_from_ten_to_thirty_percent_keeps_every_key_that_was_in():
    at_10, at_30 = _in_canary(_route(10)), _in_canary(_route(30))
    assert at_10 <= at_30
    assert abs(len(at_30) / len(KEYS) - 0.30) <= 0.01
    # listed first, the canary grows from the other end of the buckets: the same holds
    canary_first = [_first(10), _first(30)]
    assert canary_first[0] <= canary_first[1]


def _first(canary: int) -> set[str]:
    split = [{"target": "canary", "weight": canary}, {"target": "production", "weight": 100 - canary}]
    router = Router.from_settings("emb", RouteSettings.model_validate({"split": split, "sticky": "api_key"}))
    return _in_canary(router)


def test_a_key_lands_in_independent_buckets_for_different_models():
    same = sum(bucket(k, "emb") // 1000 == bucket(k, "other") // 1000 for k in KEYS)
    assert same < len(KEYS) * 0.2  # independent deciles agree about a tenth of the time, not always


def test_a_header_keeps_requests_sticky_and_without_a_key_each_request_is_drawn():
    router = _route(50, sticky="header:X-User")
    user = RouteKeys(api_key="shared", headers={b"x-user": b"alice"})
    assert len({router.pick(user) for _ in range(50)}) == 1
    drawn = Counter(router.pick(RouteKeys(api_key="shared")) for _ in range(400))  # no header: random
    assert set(drawn) == {"emb@production", "emb@canary"}
    assert set(Counter(_route(50, sticky=None).pick(None) for _ in range(400))) == {"emb@production", "emb@canary"}


def test_an_arm_of_weight_zero_gets_nothing_and_targets_name_aliases_versions_or_references():
    route = RouteSettings.model_validate(
        {"split": [{"target": "2", "weight": 0}, {"target": "other@x", "weight": 100}], "sticky": "api_key"}
    )
    router = Router.from_settings("emb", route)
    assert router.refs == ("emb:2", "other@x")
    assert {router.arm(b) for b in range(BUCKETS)} == {"other@x"}


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"split": [{"target": "a", "weight": 60}, {"target": "b", "weight": 30}]}, "sum to 90"),
        ({"split": [{"target": "a", "weight": 50}, {"target": "a", "weight": 50}]}, "once"),
        ({"split": [{"target": "a", "weight": 101}]}, "less than or equal to 100"),
        ({"split": [{"target": "a", "weight": "ten"}]}, "valid integer"),
        ({"split": []}, "at least 1"),
        ({"split": [{"target": "a", "weight": 100}], "sticky": "cookie"}, "header:NAME"),
    ],
)
def test_an_invalid_split_is_refused_naming_the_problem(route, message):
    with pytest.raises(ValidationError, match=message):
        RouteSettings.model_validate(route)


def test_routes_are_keyed_by_model_name():
    with pytest.raises(ValidationError, match="keyed by model name"):
        Settings(routing={"emb@production": {"split": [{"target": "a", "weight": 100}]}})


# -- the pool and the HTTP edge ------------------------------------------------------------------
@pytest.fixture
def two_versions(registry, fake_model):
    registry.register(fake_model("embed", seed=1), "emb", "embed", alias="production")
    registry.register(fake_model("embed", seed=2), "emb", "embed", alias="canary")
    registry.register(fake_model("classify"), "cls", "classify")
    return registry


def _split(settings, canary: int, sticky: str | None = "header:X-User"):
    split = [{"target": "production", "weight": 100 - canary}, {"target": "canary", "weight": canary}]
    return settings.model_copy(update={"routing": {"emb": RouteSettings(split=split, sticky=sticky)}})


def test_http_requests_for_the_bare_name_are_split_and_answered_by_both_versions(settings, two_versions, serving):
    users = [f"user-{i}" for i in range(30)]

    async def versions(client, model="emb"):
        got = {}
        for user in users:
            r = await client.post(f"/v1/models/{model}/predict", json={"inputs": ["hi"]}, headers={"X-User": user})
            assert r.status_code == 200, r.text
            got[user] = r.json()["version"]
        return got

    async def main():
        refs = ("emb@production", "emb@canary")
        async with serving(_split(settings, 50), two_versions, refs) as (app, client):
            first, second = await versions(client), await versions(client)
            pinned = await versions(client, "emb@production")  # a reference is never split
            app.state.service.reconfigure(_split(settings, 100))
            moved = await versions(client)
            return first, second, pinned, moved

    first, second, pinned, moved = asyncio.run(main())
    assert set(first.values()) == {1, 2}
    assert first == second  # each user stays on its arm
    assert set(pinned.values()) == {1}
    assert set(moved.values()) == {2}


def test_a_split_to_a_target_this_process_does_not_serve_is_refused_and_changes_nothing(
    settings, two_versions, serving
):
    async def main():
        async with serving(settings, two_versions, ("emb@production", "cls")) as (app, client):
            with pytest.raises(Unprocessable) as refused:
                app.state.service.reconfigure(_split(settings, 10))
            before = app.state.pool.routes
            other = settings.model_copy(
                update={"routing": {"gen": RouteSettings(split=[{"target": "x", "weight": 100}])}}
            )
            app.state.service.reconfigure(other)  # a model another process serves: not this one's business
            r = await client.post("/v1/models/emb/predict", json={"inputs": ["hi"]})
            return refused.value, before, app.state.pool.routes, r.json()["version"]

    refused, before, after, version = asyncio.run(main())
    assert refused.code == "split_target_not_served" and "emb@canary" in refused.message
    assert before == {} and after == {}
    assert version == 1


def test_the_route_keys_of_the_context_choose_the_arm(settings, two_versions, serving):
    async def main():
        refs = ("emb@production", "emb@canary")
        async with serving(_split(settings, 30, sticky="api_key"), two_versions, refs) as (app, _):
            pool = app.state.pool
            router = pool.routes["emb"]
            picked = {}
            for key in ("a", "b", "c", "d", "e", "f", "g", "h"):
                token = ROUTE_KEYS.set(RouteKeys(api_key=key))
                try:
                    picked[key] = (pool.lookup("emb").version, router.pick(RouteKeys(api_key=key)))
                finally:
                    ROUTE_KEYS.reset(token)
            return picked

    for version, ref in asyncio.run(main()).values():
        assert version == (2 if ref == "emb@canary" else 1)


# -- gray releases by request share ------------------------------------------------------------------
def test_a_request_share_gray_release_takes_a_sticky_share_and_keeps_its_keys_as_it_grows():
    def covered(percent: int) -> set[str]:
        gray = RequestGray(7, "global", percent, "api_key")
        return {k for k in KEYS if gray.covers(RouteKeys(api_key=k))}

    at_10, at_30 = covered(10), covered(30)
    assert abs(len(at_10) / len(KEYS) - 0.10) <= 0.01 and at_10 <= at_30
    assert not RequestGray(7, "global", 99, "header:X-User").covers(RouteKeys(api_key="k"))  # no header: main line
    small, large = RequestGray(5, "model:emb", 1, "api_key"), RequestGray(7, "global", 99, "api_key")
    for key in KEYS[:100]:  # the first release that covers a request is its lane
        keys = RouteKeys(api_key=key)
        expected = 5 if small.covers(keys) else 7 if large.covers(keys) else None
        assert lane_of([small, large], keys) == expected


def test_requests_in_a_gray_release_by_request_share_get_its_filter_and_split_and_the_others_the_main_line(
    settings, two_versions, serving
):
    gray_values = {
        "security": {"filters": {"emb": {"input_deny": ["forbidden"]}}},
        "routing": {"emb": {"split": [{"target": "canary", "weight": 100}]}},
    }
    users = [f"user-{i}" for i in range(30)]

    async def main():
        async with serving(_split(settings, 0), two_versions, ("emb@production", "emb@canary")) as (app, client):
            center, subscriber = app.state.config_center, app.state.config_delivery.subscriber
            center.edit_draft("global", gray_values, author="tester")
            gray = {"percent": 50, "by": "request", "key": "header:X-User"}
            release = await asyncio.to_thread(center.publish, "global", author="tester", gray=gray)
            await eventually(lambda: subscriber.revision >= center.revision(), what="the gray release applied")
            got = {}
            for user in users:
                headers = {"X-User": user}
                r = await client.post("/v1/models/emb/predict", json={"inputs": ["hello"]}, headers=headers)
                blocked = await client.post("/v1/models/emb/predict", json={"inputs": ["forbidden"]}, headers=headers)
                got[user] = (r.json()["version"], blocked.status_code)
            return release, app.state.guard.grays, got

    release, grays, got = asyncio.run(main())
    assert [g.number for g in grays] == [release.number]
    in_lane = {u for u in users if grays[0].covers(RouteKeys(headers={b"x-user": u.encode()}))}
    assert 0 < len(in_lane) < len(users)
    for user, answer in got.items():
        assert answer == ((2, 400) if user in in_lane else (1, 200)), user
