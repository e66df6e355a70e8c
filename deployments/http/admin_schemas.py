"""Request bodies of the adapter admin routes (vLLM-compatible and REST)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoadLoraRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body, plus lorafleet's optional fields."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model: str | None = Field(None, description="needed only when several base models are served")
    replace: bool = Field(False, description="swap the weights of an existing name (new id)")
    force: bool = Field(False, description="skip the base-model shape check")
    pinned: bool = Field(False, description="never evicted from an engine replica once loaded")
    preload: bool = Field(False, description="loaded on every engine replica now, so its first request does no load")


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)


class AdapterCreate(BaseModel):
    """`POST /v1/adapters` body."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    base_model: str | None = None
    replace: bool = False
    force: bool = False
    pinned: bool = Field(False, description="never evicted from an engine replica once loaded")
    preload: bool = Field(False, description="loaded on every engine replica now, so its first request does no load")


class AdapterUpdate(BaseModel):
    """`PATCH /v1/adapters/{name}` body: the residency flags of a registered adapter."""

    model_config = ConfigDict(extra="forbid")

    pinned: bool | None = Field(None, description="never evicted from an engine replica once loaded")
    preload: bool | None = Field(None, description="loaded on every engine replica of its model")
