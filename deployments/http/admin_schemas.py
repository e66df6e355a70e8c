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
    pinned: bool | None = Field(None, description="never evicted from an engine replica once loaded (replace: kept)")
    preload: bool | None = Field(
        None, description="loaded on every engine replica now, so its first request does no load (replace: kept)"
    )


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
    pinned: bool | None = Field(None, description="never evicted from an engine replica once loaded (replace: kept)")
    preload: bool | None = Field(
        None, description="loaded on every engine replica now, so its first request does no load (replace: kept)"
    )


class AdapterUpdate(BaseModel):
    """`PATCH /v1/adapters/{name}` body: the residency flags of a registered adapter."""

    model_config = ConfigDict(extra="forbid")

    pinned: bool | None = Field(None, description="never evicted from an engine replica once loaded")
    preload: bool | None = Field(None, description="loaded on every engine replica of its model")


class KeyCreate(BaseModel):
    """`POST /v1/keys` body: a tenant key (the secret is in the answer, once)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the key's name (unique; revoked keys keep theirs)")
    tenant: str | None = Field(None, description="the tenant it belongs to (default: its name); adapters `<tenant>:*`")
    models: list[str] = Field(
        default_factory=list, description="fnmatch patterns of models and adapters it may use (default: base models)"
    )
    can_register: bool = Field(False, description="may register adapters named `<tenant>:...` and remove them")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")
