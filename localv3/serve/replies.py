"""The OpenAI response objects: whole answers, and the chunks of a streamed one.

Chat answers carry the thinking in `reasoning_content` (as DeepSeek's API does) and tool
calls in `tool_calls`; every final object also carries `x_localv3`, the request's timings
(time queued, prefill, time to first token, tok/s, prompt tokens reused from the cache).
"""

from __future__ import annotations

import time
import uuid

from localv3.serve.answer import Delta
from localv3.serve.turns import Finished


class Replies:
    """The objects of one request; subclasses shape the choices."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _object(self, name: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, answer: Delta, finished: Finished) -> dict:
        choice = {"index": 0, **self._answer_fields(answer, finished), "logprobs": None, "finish_reason": finished.finish_reason}
        return self._object(self.object_name, [choice], usage=finished.usage(), x_localv3=finished.timings())

    def chunks(self, event: Delta | Finished) -> list[dict]:
        """The stream chunks for one event: a piece of the answer, or its end."""
        if isinstance(event, Delta):
            return [self._chunk(self._delta_fields(event))]
        end = [self._chunk(self._final_delta_fields(event), event.finish_reason, x_localv3=event.timings())]
        if self.include_usage:
            end.append(self._object(self.chunk_object_name, [], usage=event.usage()))
        return end

    def _chunk(self, fields: dict, finish_reason: str | None = None, **extra) -> dict:
        choice = {"index": 0, **fields, "logprobs": None, "finish_reason": finish_reason}
        return self._object(self.chunk_object_name, [choice], **extra)

    def _answer_fields(self, answer: Delta, finished: Finished) -> dict:
        raise NotImplementedError

    def _delta_fields(self, delta: Delta) -> dict:
        raise NotImplementedError

    def _final_delta_fields(self, finished: Finished) -> dict:
        raise NotImplementedError


class ChatReplies(Replies):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool = False):
        super().__init__(model, include_usage)
        self.role_sent = False

    def _answer_fields(self, answer: Delta, finished: Finished) -> dict:
        content = (answer.content or None) if finished.tool_calls else answer.content  # null beside calls
        message = {"role": "assistant", "content": content}
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if finished.tool_calls:
            message["tool_calls"] = finished.tool_calls
        return {"message": message}

    def _delta_fields(self, delta: Delta) -> dict:
        fields = {}
        if not self.role_sent:
            fields["role"] = "assistant"
            self.role_sent = True
        if delta.reasoning:
            fields["reasoning_content"] = delta.reasoning
        if delta.content or not delta.reasoning:
            fields["content"] = delta.content
        return {"delta": fields}

    def _final_delta_fields(self, finished: Finished) -> dict:
        fields = self._delta_fields(Delta())["delta"] if not self.role_sent else {}
        fields.pop("content", None)
        if finished.tool_calls:
            fields["tool_calls"] = [{"index": i, **call} for i, call in enumerate(finished.tool_calls)]
        return {"delta": fields}


class CompletionReplies(Replies):
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _answer_fields(self, answer: Delta, finished: Finished) -> dict:
        return {"text": answer.content}

    def _delta_fields(self, delta: Delta) -> dict:
        return {"text": delta.content}

    def _final_delta_fields(self, finished: Finished) -> dict:
        return {"text": ""}
