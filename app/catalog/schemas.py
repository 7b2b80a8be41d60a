"""The model resource's response bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.model_catalog import ModelInfo as CatalogEntry


class ModelProblem(BaseModel):
    code: str = Field(
        description="Why the model cannot be trained: `unsafe_weights` (pickle weights only), `invalid_model`, "
        "`remote_code`, `no_chat_template`, `no_end_of_turn`, `adapter`, `path_not_allowed` (a link or "
        "shard that leads outside the model root)."
    )
    message: str = Field(description="What is wrong and what to do about it.")


class ModelInfo(BaseModel):
    id: str = Field(
        description='The name a job gives as `model`: "default" or the folder\'s name under a model root.'
    )
    source: Literal["embedded", "local"] = Field(
        description="`embedded`: shipped with the service; `local`: a directory under the server's model roots."
    )
    architecture: str | None = Field(description="From config.json, e.g. `LlamaForCausalLM`.")
    parameters: int | None = Field(description="Parameter count, from the safetensors headers.")
    context_length: int | None = Field(description="Longest sequence the model takes (config.json).")
    dtype: str | None = Field(description="The weights' dtype as stored.")
    chat_template: bool = Field(description="The tokenizer has a chat template (GAtt needs one).")
    end_of_turn_token: str | None = Field(
        description="The special token that closes a reply in the chat template: where the loss masks end "
        "each trained span and where generation stops. Null when the model cannot be trained, or when only "
        "a slow tokenizer is present (the worker finds it when it loads the model)."
    )
    trainable: bool = Field(
        description="A job can fine-tune it: safetensors, no remote code, a chat template."
    )
    problem: ModelProblem | None = Field(description="Why it cannot be trained; null when it can.")

    @classmethod
    def of(cls, info: CatalogEntry) -> ModelInfo:
        problem = ModelProblem(code=info.reason, message=info.detail or "") if info.reason else None
        return cls(
            id=info.id,
            source=info.source,  # type: ignore[arg-type]
            architecture=info.architecture,
            parameters=info.parameters,
            context_length=info.context_length,
            dtype=info.dtype,
            chat_template=info.chat_template,
            end_of_turn_token=info.end_of_turn,
            trainable=info.trainable,
            problem=problem,
        )


class ModelList(BaseModel):
    data: list[ModelInfo] = Field(
        description="`default` first, then the models under each root in the order the roots are configured, "
        "by id. Models that cannot be trained are listed too, with the reason."
    )
