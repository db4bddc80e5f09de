"""Request bodies of /v1/chat/completions and /v1/completions, checked field by field.

Every problem is an ApiError naming the field (OpenAI's `param`): a wrong type or range is a
400, a model this server does not serve a 404. Parameters we cannot honour (n > 1, logprobs,
a forced tool choice, a JSON response format) are refused rather than silently ignored;
fields we have no use for (user, metadata, penalties left at 0, ...) are ignored, as clients
send them freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localv3.serve.errors import ApiError, bad_request

ROLES = ("system", "user", "assistant", "tool")
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes
PENALTIES = ("presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Sampling:
    """The generation settings of one request; None: the model's own default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # as the chat template reads them: role, content, tool_calls, tool_call_id
    sampling: Sampling
    tools: list[dict] = field(default_factory=list)  # function definitions: name, description, parameters
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]  # text (tokenised as is) or token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: dict, served_name: str) -> ChatRequest:
    _check_common(body, served_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array of message objects", "messages")
    tools = _tools(body)
    return ChatRequest(
        messages=[_message(i, m) for i, m in enumerate(messages)],
        sampling=_sampling(body),
        tools=tools,
        stream=_stream(body),
        include_usage=_include_usage(body),
    )


def parse_completion_request(body: dict, served_name: str) -> CompletionRequest:
    _check_common(body, served_name)
    for name, allowed in (("echo", (None, False)), ("suffix", (None,)), ("best_of", (None, 1))):
        if body.get(name) not in allowed:
            raise bad_request(f"{name} is not supported by this server", name)
    return CompletionRequest(
        prompt=_prompt(body.get("prompt")),
        sampling=_sampling(body),
        stream=_stream(body),
        include_usage=_include_usage(body),
    )


# ----- shared fields ---------------------------------------------------------------------------
def _check_common(body: dict, served_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name /v1/models lists", "model")
    if model != served_name:
        raise ApiError(
            404, f"the model {model!r} does not exist; this server serves {served_name!r}", param="model",
            code="model_not_found",
        )
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: this server returns one choice per request", "n")
    if body.get("logprobs") not in (None, False, 0):
        raise bad_request("logprobs are not supported by this server", "logprobs")
    for name in PENALTIES:
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported by this server (leave it at 0)", name)


def _sampling(body: dict) -> Sampling:
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(
        max_tokens=_integer(body, limit_name, low=1),
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=_integer(body, "top_k", low=0),
        seed=_integer(body, "seed", *SEED_RANGE),
        stop=_stop(body.get("stop")),
    )


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise bad_request(f"{name} must be a whole number {bounds}, not {value!r}", name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number from {low:g} to {high:g}, not {value!r}", name)
    return float(value)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_request("stop must be a string or an array of strings", "stop")


def _stream(body: dict) -> bool:
    value = body.get("stream", False)
    if not isinstance(value, bool) and value is not None:
        raise bad_request(f"stream must be true or false, not {value!r}", "stream")
    return bool(value)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request('stream_options must be {"include_usage": true|false}', "stream_options")
    return options.get("include_usage", False)


# ----- chat ------------------------------------------------------------------------------------
def _message(i: int, message) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with a role and content", where)
    role = "system" if message.get("role") == "developer" else message.get("role")
    if role not in ROLES:
        raise bad_request(
            f"{where}.role must be one of system, developer, user, assistant, tool, not {message.get('role')!r}",
            f"{where}.role",
        )
    content = _content(message.get("content"), f"{where}.content", optional=role == "assistant")
    out = {"role": role, "content": content}
    if role == "assistant" and message.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if content is None and "tool_calls" not in out:
        raise bad_request(f"{where} needs content (or, from the assistant, tool_calls)", f"{where}.content")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(f"{where}.tool_call_id must name the call this message answers", f"{where}.tool_call_id")
        out["tool_call_id"] = call_id
    return out


def _content(value, where: str, optional: bool) -> str | None:
    """A string, or text parts joined by newlines; None only where `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}] must be a text part: this model reads text only", f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where} must be a string or an array of text parts", where)


def _tool_calls(value, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise bad_request(f"{where} must be an array", where)
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise bad_request(
                f'{where}[{j}] must be {{"id": ..., "type": "function", "function": {{"name": str, "arguments": str}}}}',
                f"{where}[{j}]",
            )
        calls.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return calls


def _tools(body: dict) -> list[dict]:
    """The function definitions offered, [] when none are (or tool_choice is "none")."""
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad_request(
            'tool_choice must be "auto" or "none": this server cannot force the model to call a tool', "tool_choice"
        )
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request('response_format must be {"type": "text"}: structured output is not supported', "response_format")
    tools = body.get("tools")
    if tools is None or choice == "none":
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be an array of function tools", "tools")
    functions = []
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f'tools[{j}] must be {{"type": "function", "function": {{...}}}}', f"tools[{j}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"tools[{j}].function.name must be a non-empty string", f"tools[{j}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad_request(f"tools[{j}].function.parameters must be a JSON schema object", f"tools[{j}].function")
        functions.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    return functions


# ----- completions -----------------------------------------------------------------------------
def _prompt(value) -> str | list[int]:
    """One prompt: a string or token ids, bare or as the only element of an array."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise bad_request("prompt must be one string or one non-empty array of token ids", "prompt")
