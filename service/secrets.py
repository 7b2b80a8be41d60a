"""Webhook signing secrets sealed at rest, when the operator gives keys (`GATT_SECRET_KEYS`).

A webhook secret must be readable by the service (it signs each message with it), so unlike an API
key it cannot be stored as a hash. With keys set, it is stored as `fernet:<token>` (cryptography's
Fernet: AES-128-CBC with an HMAC-SHA256, authenticated), and someone who reads the database alone
cannot sign messages as the service. Several keys, comma-separated: the first seals, every one opens,
so an operator rotates by putting a new key first and dropping the old one once no row needs it
(a secret sealed with an old key is sealed again with the first at its next delivery).

Without keys, secrets are stored as they are, as before: `open` reads both forms, so keys can be
introduced on a running service (clear secrets are sealed at their next delivery).
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

PREFIX = "fernet:"


class SecretBox:
    def __init__(self, keys: list[str]):
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys]) if keys else None
        self._first = Fernet(keys[0].encode()) if keys else None

    @property
    def active(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._first is None:
            return secret
        return PREFIX + self._first.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored
        if self._fernet is None:
            raise ValueError("a webhook secret is sealed, but GATT_SECRET_KEYS is not set on this process")
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise ValueError("a webhook secret is sealed with a key GATT_SECRET_KEYS does not hold") from None

    def needs_sealing(self, stored: str) -> bool:
        """Stored in clear, or sealed with a key other than the first, while keys are set."""
        if self._first is None:
            return False
        if not stored.startswith(PREFIX):
            return True
        try:
            self._first.decrypt(stored[len(PREFIX) :].encode())
            return False
        except InvalidToken:
            return True


def check_key(key: str) -> str:
    """A Fernet key (32 url-safe base64 bytes), or ValueError saying how to make one."""
    try:
        Fernet(key.encode())
    except ValueError:
        raise ValueError(
            'not a Fernet key; make one with: python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"'
        ) from None
    return key


@lru_cache(maxsize=8)
def secret_box(keys: tuple[str, ...]) -> SecretBox:
    """The box for these keys (`secret_box(tuple(settings.secret_keys))`), made once."""
    return SecretBox(list(keys))
