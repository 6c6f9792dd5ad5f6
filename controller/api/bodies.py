"""The two kinds of API model every schema module builds on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Create(BaseModel):
    """A request body: a field the API does not know is an error (422), never ignored."""

    model_config = ConfigDict(extra="forbid")


class Public(BaseModel):
    """A response, read from the domain's objects by attribute."""

    model_config = ConfigDict(from_attributes=True)
