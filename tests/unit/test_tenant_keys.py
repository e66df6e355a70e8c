"""Who a request is from and what it may use (deployments/http/tenants.py), without Ray."""

import pytest
from starlette.requests import Request

from deployments.http.request_metrics import MAX_KEY_LABELS, Metrics
from deployments.http.tenants import ADMIN, API_KEY, OPEN, Caller, Gate, RateLimits
from lora_registry.key_store import KeyRecord, hash_key
from serve_app.config import IngressConfig
from serve_app.errors import AuthenticationError, PermissionDeniedError, RateLimitError

BASES = {"tiny-chat", "tiny-base"}


def key(name="acme", models=(), can_register=False, rpm=None, tpm=None, tenant=None) -> tuple[KeyRecord, str]:
    secret = f"lf-secret-of-{name}"
    record = KeyRecord(name, tenant or name, hash_key(secret), "lf-secr...", models, can_register, rpm, tpm, 0.0)
    return record, secret


def request(secret: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {secret}".encode())] if secret else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_who_calls():
    acme, secret = key()
    keys = {acme.key_hash: acme}
    gate = Gate(IngressConfig(api_key="k", admin_api_key="admin"))
    assert gate.caller(request("admin"), keys) is ADMIN and gate.caller(request("k"), keys) is API_KEY
    assert gate.caller(request(secret), keys) == Caller("tenant", acme)
    assert gate.caller(request("lf-unknown"), keys) is None and gate.caller(request(), keys) is None
    open_gate = Gate(IngressConfig())
    assert open_gate.caller(request(), {}) is OPEN  # no key anywhere: open, as before tenant keys
    assert open_gate.caller(request(), keys) is None  # once a tenant key exists, every request needs one
    assert open_gate.caller(request(secret), keys).key == acme


def test_admin_routes():
    acme, secret = key(can_register=True)
    plain, plain_secret = key("plain")
    keys = {acme.key_hash: acme, plain.key_hash: plain}
    gate = Gate(IngressConfig(api_key="k", admin_api_key="admin"))
    assert gate.admin(request("admin"), keys) is ADMIN
    assert gate.admin(request(secret), keys, tenants_may_register=True).key == acme
    for given, status in [(secret, 403), (plain_secret, 403), ("k", 403), (None, 401), ("wrong", 401)]:
        with pytest.raises((PermissionDeniedError, AuthenticationError)) as error:
            gate.admin(request(given), keys, tenants_may_register=given == plain_secret)
        assert error.value.status == status
    assert Gate(IngressConfig()).admin(request(), {}) is OPEN
    with pytest.raises(AuthenticationError, match="admin_api_key, which is not set"):
        Gate(IngressConfig()).admin(request(), keys)  # keys on, no admin key configured: closed


def test_what_a_tenant_sees():
    acme = Caller("tenant", key(tenant="acme")[0])
    assert acme.may_use("tiny-chat", BASES) and acme.may_use("acme:bot", BASES)
    assert not acme.may_use("globex:bot", BASES) and not acme.may_use("xiao-huang", BASES)
    assert acme.owns("acme:bot") and not acme.owns("acme-bot") and not acme.owns("globex:bot")
    patterns = Caller("tenant", key(models=("tiny-chat", "shared-*"))[0])
    assert patterns.may_use("shared-sql", BASES) and not patterns.may_use("tiny-base", BASES)
    assert API_KEY.may_use("globex:bot", BASES) and ADMIN.owns("globex:bot")


def test_requests_per_minute_then_retry_after():
    acme, _ = key(rpm=2)
    limits = RateLimits(share=1.0)
    limits.admit(acme)
    limits.admit(acme)
    with pytest.raises(RateLimitError) as error:
        limits.admit(acme)
    assert error.value.status == 429 and error.value.type == "requests"
    assert 1 <= int(error.value.headers["Retry-After"]) <= 30  # one request comes back in 30 s


def test_tokens_are_charged_after_the_response_and_block_until_refilled():
    acme, _ = key(tpm=600)
    limits = RateLimits(share=1.0)
    reserved = limits.admit(acme)  # no max_tokens: one token set aside
    limits.settle(acme, reserved, 900)  # a long answer may overdraw; the next request waits for the refill
    with pytest.raises(RateLimitError) as error:
        limits.admit(acme)
    assert error.value.type == "tokens" and 25 <= int(error.value.headers["Retry-After"]) <= 31


def test_max_tokens_are_set_aside_at_admission_and_the_rest_given_back():
    acme, _ = key(tpm=600)
    limits = RateLimits(share=1.0)
    first = limits.admit(acme, max_tokens=400)
    with pytest.raises(RateLimitError):  # in flight together, they could use 800 of 600
        limits.admit(acme, max_tokens=400)
    limits.settle(acme, first, 150)  # it used 150: 250 come back
    assert limits.admit(acme, max_tokens=400) == 400


def test_a_max_tokens_above_the_limit_needs_a_full_bucket():
    acme, _ = key(tpm=600)
    limits = RateLimits(share=1.0)
    assert limits.admit(acme, max_tokens=10_000) == 600  # capped: it can still be served
    with pytest.raises(RateLimitError):
        limits.admit(acme, max_tokens=10_000)


def test_each_ingress_replica_enforces_its_share():
    acme, _ = key(rpm=4)
    limits = RateLimits(share=1 / 2)
    limits.admit(acme)
    limits.admit(acme)
    with pytest.raises(RateLimitError):
        limits.admit(acme)


def test_key_labels_are_bounded():
    metrics = Metrics()
    labels = {metrics.key_labels("acme", f"k{i}") for i in range(MAX_KEY_LABELS + 50)}
    assert len(labels) == MAX_KEY_LABELS + 1 and ("(other)", "(other)") in labels
    assert metrics.key_labels("acme", "k0") == ("acme", "k0")


def test_a_tenants_adapters_are_its_own_whatever_the_patterns():
    everything = Caller("tenant", key(models=("*",))[0])
    assert everything.may_use("tiny-base", BASES) and everything.may_use("shared-sql", BASES)
    assert not everything.may_use("globex:bot", BASES)  # `<tenant>:...` belongs to that tenant alone
    assert everything.may_use("acme:bot", BASES)


def test_revoking_the_last_key_does_not_open_the_api():
    gate = Gate(IngressConfig(admin_api_key="admin"))
    assert gate.caller(request(), {}, keys_on=True) is None
    with pytest.raises(AuthenticationError):
        gate.admin(request(), {}, keys_on=True)
    assert gate.caller(request(), {}, keys_on=False) is OPEN


def test_a_tenant_registers_only_from_its_own_folders(tmp_path):
    from lora_registry.path_policy import PathPolicy

    (tmp_path / "acme" / "bot").mkdir(parents=True)
    (tmp_path / "globex" / "bot").mkdir(parents=True)
    policy = PathPolicy([str(tmp_path), "s3://bucket/tenants"])
    assert policy.check(str(tmp_path / "acme" / "bot"), "acme") == str((tmp_path / "acme" / "bot").resolve())
    assert policy.check("s3://bucket/tenants/acme/bot", "acme") == "s3://bucket/tenants/acme/bot"
    for path in (str(tmp_path / "globex" / "bot"), "s3://bucket/tenants/globex/bot", "s3://bucket/tenants/acme-x/b"):
        with pytest.raises(PermissionDeniedError):
            policy.check(path, "acme")
    assert policy.check(str(tmp_path / "globex" / "bot")) == str((tmp_path / "globex" / "bot").resolve())  # admin
