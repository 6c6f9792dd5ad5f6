"""/v1/signing-key: the controller's Ed25519 public key, and its rotation."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import ControllerDep, minimum_role
from controller.api.schemas import SigningKeyPublic
from controller.auth import Role
from controller.signing import Signer

router = APIRouter(tags=["signing"])


def _public(signer: Signer) -> SigningKeyPublic:
    rotation = signer.rotation
    return SigningKeyPublic(
        key_id=signer.key_id,
        public_key=signer.public_key_hex,
        previous_key_id=rotation.old_key_id if rotation is not None else "",
    )


@router.get("/signing-key", response_model=SigningKeyPublic)
def get_signing_key(controller: ControllerDep) -> SigningKeyPublic:
    """The key agents pin at provisioning ([security] controller_public_key)."""
    return _public(controller.signer)


@router.post("/signing-key/rotate", response_model=SigningKeyPublic, openapi_extra=minimum_role(Role.ADMIN))
def rotate_signing_key(controller: ControllerDep) -> SigningKeyPublic:
    """Replace the key; agents switch when they receive an assignment signed with the new one."""
    return _public(controller.rotate_signing_key())
