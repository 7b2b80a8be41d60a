"""The API key format, pure functions only.

A key is ``gatt_<prefix>_<secret>``: `prefix` is 8 random characters of [a-z0-9] (stored in clear and
indexed, so a key is found with one indexed lookup and can be named in logs and admin commands),
`secret` is 43 URL-safe base64 characters (256 random bits). Only the SHA-256 of the whole key is
stored; see `service.models.api_key` for why a fast hash is right for such keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

KEY_PREFIX = "gatt"
PREFIX_LENGTH = 8
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([a-z0-9]{{{PREFIX_LENGTH}}})_([A-Za-z0-9_-]{{43}})$")


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once to whoever created it, never stored
    prefix: str
    key_hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(key=key, prefix=prefix, key_hash=hash_key(key))


def parse_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


def key_matches(key: str, key_hash: str) -> bool:
    # Constant-time, so response timing reveals nothing about how much of the hash matched.
    return hmac.compare_digest(hash_key(key), key_hash)
