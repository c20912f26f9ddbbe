"""Request bodies of the OpenAI-compatible routes (pydantic, strict: "stream": "yes" is a 400).

Each generation body also checks what it does not support and says which output plan (plain text,
JSON, tool calls) and which log-probs it asks for.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..logprobs import MAX_TOP_LOGPROBS
from ..structured import GrammarError
from ..tools import OutputPlan, output_plan
from .errors import APIError

MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class GenerationBody(BaseModel):
    """What completions and chat completions share: the model, sampling, stops, streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)  # "stream": "yes", "n": "2", [true] as ids: 400

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)  # a 64-bit generator seed
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past EOS (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def unsupported(self) -> None:
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(self, field):
                raise APIError(400, f"{field} is not supported by this server", param=field, code="unsupported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict | None = None  # vLLM's extension: json_object / json_schema for completions too

    def output_plan(self) -> OutputPlan:
        try:
            return output_plan(None, None, self.response_format)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def unsupported(self) -> None:
        super().unsupported()
        if (self.best_of or 1) > 1 or self.suffix:
            raise APIError(400, "best_of and suffix are not supported", param="best_of", code="unsupported")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (it scores the prompt only)", param="max_tokens")

    def logprob_options(self) -> tuple[int | None, bool]:
        """(alternatives per token or None for no log-probs, score the prompt too)."""
        return self.logprobs, self.echo and self.logprobs is not None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str | dict = "{}"  # OpenAI sends a JSON string; an object is taken as it is


class ToolCall(BaseModel):
    """An assistant's earlier call, as OpenAI writes it: {"id", "type": "function", "function": {...}}."""
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None       # a tool result's call

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def output_plan(self) -> OutputPlan:
        try:
            return output_plan(self.tools, self.tool_choice, self.response_format)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def logprob_options(self) -> tuple[int | None, bool]:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, False


class AdapterBody(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    path: str


