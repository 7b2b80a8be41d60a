"""The API-key resource's request and response bodies."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.models import ApiKey


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=100, description="A label, e.g. 'ci' or 'nightly'.")


class Key(BaseModel):
    prefix: str = Field(description="The 8 characters after `gatt_`: safe to show and log.")
    name: str | None = Field(description="The label given at creation.")
    created_at: datetime = Field(description="When it was made.")
    revoked_at: datetime | None = Field(description="When it was revoked; it no longer authenticates.")

    @classmethod
    def from_row(cls, row: ApiKey) -> Key:
        return cls(prefix=row.prefix, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at)


class NewKey(Key):
    key: str = Field(description="The key itself (`gatt_<prefix>_<secret>`), shown only in this answer.")


class KeyList(BaseModel):
    data: list[Key] = Field(description="The team's keys, oldest first, revoked ones included.")
