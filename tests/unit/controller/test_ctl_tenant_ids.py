"""Tenant ids: one pattern (the contract's) for the tenants a device declares and for the
tenants rollouts name, which may also name a tenant's shadow slot."""

from __future__ import annotations

import pytest
from edgefleet_proto.topics import validate_device_id
from edgefleet_proto.wave import _WAVE_ID

from controller.errors import InvalidInputError, InvalidTenantSpec
from controller.fleet import validate_tags
from controller.registry import validate_name
from controller.retraining_policies import POLICY_NAME
from controller.rollouts import is_tenant_slot
from controller.tenants import parse_tenant

IDS = ["default", "a", "cam-1", "door_2", "Z9", "a" * 64]
NOT_IDS = ["", "door\n", "-a", "_a", "a b", "a/b", "a:b", "a" * 65, "a.b", "key.word", "a.", ".a", "é"]


def declares(tenant_id: str) -> bool:
    try:
        parse_tenant({"id": tenant_id, "model": "adder"}, {"adder"}, "tenants[0]")
    except InvalidTenantSpec as exc:
        assert "invalid tenant id" in str(exc)
        return False
    return True


@pytest.mark.parametrize("tenant_id", IDS)
def test_a_tenant_id_is_declared_and_rolled_out_to_with_its_shadow_slot(tenant_id: str) -> None:
    assert declares(tenant_id)
    assert is_tenant_slot(tenant_id)
    assert is_tenant_slot(f"{tenant_id}.shadow")
    # The shadow slot is the rollout's name for it; a device declares only the tenant.
    assert not declares(f"{tenant_id}.shadow")


@pytest.mark.parametrize("name", NOT_IDS)
def test_anything_else_is_refused_in_both_places_and_has_no_shadow_slot(name: str) -> None:
    assert not declares(name)
    assert not is_tenant_slot(name)
    assert not is_tenant_slot(f"{name}.shadow")


@pytest.mark.parametrize("name", [".shadow", "a.shadow.shadow", "a..shadow", "a.shadowx", "a.Shadow"])
def test_only_one_shadow_suffix_on_a_tenant_id_names_a_slot(name: str) -> None:
    assert not is_tenant_slot(name)


@pytest.mark.parametrize("name", ["dev-a\n", "dev-a\n\n"])
def test_a_name_with_a_trailing_newline_is_refused_everywhere_names_are_checked(name: str) -> None:
    """``$`` also matches before a final newline: every name pattern is matched whole."""
    with pytest.raises(ValueError, match="invalid device id"):
        validate_device_id(name)
    with pytest.raises(InvalidInputError, match="invalid model name"):
        validate_name("model name", name)
    with pytest.raises(InvalidInputError, match="invalid tag"):
        validate_tags([name])
    assert not POLICY_NAME.fullmatch(name) and not _WAVE_ID.match(name)
    assert not declares(name.strip() + "\n")
