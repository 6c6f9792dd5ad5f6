"""The operator's bearer token: random, shown once, stored as a sha256 hash.

The token carries 256 bits of entropy, so a plain sha256 is as good as a slow
password hash here and keeps every request cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)
