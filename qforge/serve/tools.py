"""Chat `tools` / `tool_choice` and `response_format`: what a chat request asks its output to be, and
the OpenAI message made of what the model wrote.

Tools reach the model through its chat template when the template renders them (`tools=` of
apply_chat_template); a template that does not (SmolLM2's ChatML one) gets them in a system message,
Hermes style: the functions' JSON signatures between <tools></tools> and the instruction to answer a
call as <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Earlier tool calls and tool results
in the conversation are rendered the same way.

  tool_choice "none"       no tools offered; plain text
  tool_choice "auto"       (default with tools) the model may write <tool_call> blocks; each one that
                           parses and names an offered tool becomes a `tool_calls` entry
  tool_choice "required"   the output is constrained to one call of one of the tools, by its schema
  {"type": "function", "function": {"name": N}}   the output is constrained to one call of N

A constrained call (and a response_format) is enforced token by token (structured.py): the output
parses and validates against the schema unless max_tokens cuts it short (finish_reason "length").
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .structured import GrammarError, response_format_schema, tool_call_schema

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
MAX_TOOLS = 128


@dataclass
class OutputPlan:
    """What one chat request's answer must be: a JSON schema to enforce (or none), and its tools."""

    schema: dict | None = None
    schema_param: str = "response_format"
    tools: list[dict] = field(default_factory=list)
    forced: bool = False  # the answer IS one tool call (its JSON, constrained)

    def message(self, text: str) -> tuple[dict, bool]:
        """(the assistant message, whether it holds tool calls) for the model's text."""
        calls = self._calls(text) if self.tools else []
        if not calls:
            return {"role": "assistant", "content": text}, False
        return {"role": "assistant", "content": None, "tool_calls": calls}, True

    def _calls(self, text: str) -> list[dict]:
        names = {t["function"]["name"] for t in self.tools}
        raw = [text] if self.forced else TOOL_CALL_BLOCK.findall(text)
        calls = []
        for chunk in raw:
            try:
                call = json.loads(chunk)
            except json.JSONDecodeError:
                continue
            if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict):
                calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
        return calls


def output_plan(tools: list | None, tool_choice, response_format: dict | None) -> OutputPlan:
    """The request's OutputPlan; GrammarError (a 400) naming the field that is wrong."""
    schema = response_format_schema(response_format)
    checked = check_tools(tools)
    choice = tool_choice if tool_choice is not None else ("auto" if checked else "none")
    if choice == "none":
        return OutputPlan(schema=schema)
    if not checked:
        raise GrammarError("tool_choice needs tools", "tool_choice")
    if choice == "auto":
        if schema is not None:
            raise GrammarError("response_format cannot be combined with tool_choice 'auto'; force a tool or "
                               "drop the tools", "response_format")
        return OutputPlan(tools=checked)
    if choice == "required":
        forced = checked
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        forced = [t for t in checked if t["function"]["name"] == name]
        if not forced:
            raise GrammarError(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
    else:
        raise GrammarError("tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}",
                           "tool_choice")
    return OutputPlan(schema=tool_call_schema(forced), schema_param="tools", tools=checked, forced=True)


def check_tools(tools: list | None) -> list[dict]:
    if not tools:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise GrammarError(f"tools must be a list of at most {MAX_TOOLS} functions", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise GrammarError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", f"tools.{i}")
        if not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
            raise GrammarError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'",
                               f"tools.{i}.function.name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema object",
                               f"tools.{i}.function.parameters")
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                     if k in fn}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise GrammarError("tools: two functions share a name", "tools")
    return out


# ---- the prompt ----------------------------------------------------------------------------------
def template_supports_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_messages(messages: list[dict], tools: list[dict], native: bool) -> list[dict]:
    """The messages to give the chat template. Non-native templates get the tools in a system message
    and earlier calls / results as text; native ones get them as they are."""
    if native:
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': _args(c)})}\n"
                      "</tool_call>" for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n".join(blocks)).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def tools_system_text(tools: list[dict]) -> str:
    signatures = "\n".join(json.dumps(t) for t in tools)
    return ("You may call one or more functions to answer. The functions, as JSON signatures:\n<tools>\n"
            f"{signatures}\n</tools>\nTo call one, answer with a JSON object holding its name and arguments "
            "between tags:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>")


def _args(call: dict):
    raw = call.get("function", {}).get("arguments", "{}")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw
