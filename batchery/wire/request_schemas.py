"""The request bodies of the OpenAI endpoints a batch line may call, checked once for every
backend, in the hosted API's words.

A line whose body has the wrong shape is answered here with the 400 the hosted API gives
(`invalid_type`, `invalid_value`, `missing_required_parameter`, range and length codes),
and its backend is never called. Backends keep only the checks that depend on the model:
context length, and the parameters or inputs it cannot honour.

Unknown body fields pass: servers behind the `openai` connector (vLLM, llama.cpp, ...) take
extra sampling options, and the schemas here follow the fields the official SDK sends.
Explicit nulls of optional fields mean "not given" (the SDK types them `Optional`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchery.model.batches import canonical_endpoint
from batchery.ports.backend import Reply, error_reply

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"


#: A schema's yes-or-no check of a value, as a plain function (`Node.fast`).
Validator = Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with a body: the hosted API's message, `param` and `code`."""

    message: str
    param: str | None
    code: str | None

    def reply(self) -> Reply:
        """The 400 error reply that answers the line."""
        return error_reply(400, self.message, param=self.param, code=self.code)


# -- words ------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A JSON value's type, as the hosted API names it in "but got ... instead"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _listing(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def wrong_type(path: str, expected: str, value: Any) -> Problem:
    return Problem(f"Invalid type for '{path}': expected {expected}, but got {_kind(value)} "
                   f"instead.", path, "invalid_type")


def missing_parameter(path: str) -> Problem:
    return Problem(f"Missing required parameter: '{path}'.", path, "missing_required_parameter")


def invalid_value(path: str, value: Any, supported: tuple[str, ...]) -> Problem:
    return Problem(f"Invalid value: '{value}'. Supported values are: {_listing(supported)}.",
                   path, "invalid_value")


# -- schema nodes -----------------------------------------------------------------------


class Node:
    """One JSON value's schema. `check` returns the first problem found, or None.

    `valid` answers the same question, yes or no, without building the paths and messages
    `check` needs: almost every line of a batch is valid, so each body is first asked
    `valid`, and only a body that fails it is walked again by `check` for its words."""

    #: What a type error says was expected.
    expected = "a value"

    def accepts(self, value: Any) -> bool:
        """Whether the value has this node's JSON type (unions pick a branch by it)."""
        return True

    def valid(self, value: Any) -> bool:
        """Whether `check` finds no problem (the fast answer for valid bodies)."""
        return self.fast()(value)

    def fast(self) -> Validator:
        """`valid` as a plain function, built once from the children's: a closure calls
        them with no attribute lookups on the way, which is what a batch's lines pay."""
        found: Validator | None = self.__dict__.get("_fast")
        if found is None:
            found = self._fast = self._build()
        return found

    def _build(self) -> Validator:
        return self.accepts

    def check(self, value: Any, path: str) -> Problem | None:
        return None if self.accepts(value) else wrong_type(path, self.expected, value)


class Anything(Node):
    def _build(self) -> Validator:
        return lambda value: True


class Str(Node):
    expected = "a string"

    def __init__(self, *, enum: tuple[str, ...] = (), min_length: int = 0,
                 max_length: int | None = None) -> None:
        self.enum, self.min_length, self.max_length = enum, min_length, max_length

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def _build(self) -> Validator:
        enum, low, high = frozenset(self.enum), self.min_length, self.max_length
        if not enum and not low and high is None:
            return lambda value: isinstance(value, str)

        def valid(value: Any) -> bool:
            if not isinstance(value, str) or (enum and value not in enum):
                return False
            return len(value) >= low and (high is None or len(value) <= high)
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, str):
            return wrong_type(path, self.expected, value)
        if self.enum and value not in self.enum:
            return invalid_value(path, value, self.enum)
        if len(value) < self.min_length:
            return Problem(f"Invalid '{path}': empty string. Expected a string with minimum "
                           f"length {self.min_length}, but got an empty string instead.",
                           path, "empty_string")
        if self.max_length is not None and len(value) > self.max_length:
            return Problem(f"Invalid '{path}': string too long. Expected a string with "
                           f"maximum length {self.max_length}, but got a string with length "
                           f"{len(value)} instead.", path, "string_above_max_length")
        return None


class Bool(Node):
    expected = "a boolean"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class Num(Node):
    """A number (`decimal` in the hosted API's words), optionally within bounds."""

    expected = "a decimal"
    word = "decimal"

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        self.low, self.high = low, high

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)

    def _build(self) -> Validator:
        accepts, low, high = self.accepts, self.low, self.high
        return lambda value: accepts(value) and (low is None or value >= low) and (
            high is None or value <= high)

    def check(self, value: Any, path: str) -> Problem | None:
        if not self.accepts(value):
            return wrong_type(path, self.expected, value)
        if self.low is not None and value < self.low:
            return self._bound(path, value, "below minimum", ">=", self.low, "below_min")
        if self.high is not None and value > self.high:
            return self._bound(path, value, "above maximum", "<=", self.high, "above_max")
        return None

    def _bound(self, path: str, value: float, what: str, sign: str, limit: float,
               code: str) -> Problem:
        return Problem(f"Invalid '{path}': {self.word} {what} value. Expected a value "
                       f"{sign} {_number(limit)}, but got {_number(value)} instead.", path,
                       f"{self.word}_{code}_value")


class Int(Num):
    expected = "an integer"
    word = "integer"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class Arr(Node):
    def __init__(self, item: Node, *, min_length: int = 0, max_length: int | None = None,
                 expected: str = "an array") -> None:
        self.item, self.min_length, self.max_length = item, min_length, max_length
        self.expected = expected

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def _build(self) -> Validator:
        item, low, high = self.item.fast(), self.min_length, self.max_length

        def valid(value: Any) -> bool:
            if not isinstance(value, list) or len(value) < low or (
                    high is not None and len(value) > high):
                return False
            for element in value:  # noqa: SIM110 (a loop: no generator frame per line)
                if not item(element):
                    return False
            return True
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, list):
            return wrong_type(path, self.expected, value)
        problem = _length(value, path, self.min_length, self.max_length)
        if problem is not None:
            return problem
        for i, item in enumerate(value):
            problem = self.item.check(item, f"{path}[{i}]")
            if problem is not None:
                return problem
        return None


def _length(value: list[Any], path: str, low: int, high: int | None) -> Problem | None:
    if not value and low:
        return Problem(f"Invalid '{path}': empty array. Expected an array with minimum length "
                       f"{low}, but got an empty array instead.", path, "empty_array")
    if len(value) < low:
        return Problem(f"Invalid '{path}': array too short. Expected an array with minimum "
                       f"length {low}, but got an array with length {len(value)} instead.",
                       path, "array_below_min_length")
    if high is not None and len(value) > high:
        return Problem(f"Invalid '{path}': array too long. Expected an array with maximum "
                       f"length {high}, but got an array with length {len(value)} instead.",
                       path, "array_above_max_length")
    return None


class Obj(Node):
    """An object with known fields; other fields pass unchecked. A required field must be
    present (a null there is a type error); an optional one may be null. Missing fields are
    reported first, then the first problem in the order of the object's own fields."""

    expected = "an object"

    def __init__(self, fields: Mapping[str, Node] | None = None,
                 required: tuple[str, ...] = ()) -> None:
        self.fields = dict(fields or {})
        self.required = required
        for name in required:
            self.fields.setdefault(name, Anything())

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _build(self) -> Validator:
        fields = {name: node.fast() for name, node in self.fields.items()}
        required = self.required
        needed = frozenset(required)

        def valid(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            for name in required:
                if name not in value:
                    return False
            for name, item in value.items():
                node = fields.get(name)
                if node is None or (item is None and name not in needed):
                    continue
                if not node(item):
                    return False
            return True
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, dict):
            return wrong_type(path, self.expected, value)
        for name in self.required:
            if name not in value:
                return missing_parameter(_join(path, name))
        # The body's own fields, in its order: few, where the schema knows dozens.
        fields, required = self.fields, self.required
        for name, item in value.items():
            node = fields.get(name)
            if node is None or (item is None and name not in required):
                continue
            problem = node.check(item, _join(path, name))
            if problem is not None:
                return problem
        return None


class Map(Node):
    """An object whose every value follows `values` (metadata, logit_bias)."""

    expected = "an object"

    def __init__(self, values: Node, *, max_items: int | None = None,
                 max_key_length: int | None = None) -> None:
        self.values, self.max_items, self.max_key_length = values, max_items, max_key_length

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _build(self) -> Validator:
        most, longest, values = self.max_items, self.max_key_length, self.values.fast()

        def valid(value: Any) -> bool:
            if not isinstance(value, dict) or (most is not None and len(value) > most):
                return False
            for key, item in value.items():
                if (longest is not None and len(key) > longest) or not values(item):
                    return False
            return True
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, dict):
            return wrong_type(path, self.expected, value)
        if self.max_items is not None and len(value) > self.max_items:
            return Problem(f"Invalid '{path}': too many properties. Expected an object with at "
                           f"most {self.max_items} properties, but got an object with "
                           f"{len(value)} properties instead.", path, "object_above_max_properties")
        for key, item in value.items():
            where = _join(path, key)
            if self.max_key_length is not None and len(key) > self.max_key_length:
                return Problem(f"Invalid '{where}': the key is too long. Expected a key with "
                               f"maximum length {self.max_key_length}, but got a key with "
                               f"length {len(key)} instead.", where, "invalid_value")
            problem = self.values.check(item, where)
            if problem is not None:
                return problem
        return None


class OneOf(Node):
    """A union whose branches differ in JSON type: the value's type picks the branch."""

    def __init__(self, *branches: Node, expected: str) -> None:
        self.branches, self.expected = branches, expected

    def accepts(self, value: Any) -> bool:
        return any(b.accepts(value) for b in self.branches)

    def _build(self) -> Validator:
        branches = [(branch.accepts, branch.fast()) for branch in self.branches]

        def valid(value: Any) -> bool:
            for accepts, branch in branches:
                if accepts(value):
                    return branch(value)
            return False
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        for branch in self.branches:
            if branch.accepts(value):
                return branch.check(value, path)
        return wrong_type(path, self.expected, value)


class Nullable(Node):
    """A required field that may be null."""

    def __init__(self, node: Node) -> None:
        self.node, self.expected = node, node.expected

    def accepts(self, value: Any) -> bool:
        return value is None or self.node.accepts(value)

    def _build(self) -> Validator:
        node = self.node.fast()
        return lambda value: value is None or node(value)

    def check(self, value: Any, path: str) -> Problem | None:
        return None if value is None else self.node.check(value, path)


class Tagged(Node):
    """An object whose `key` field (`type`, `role`) says which shape it has.

    `default` is the variant of an object without the key; `open` lets unknown tags pass
    (families that grow often, such as hosted tools)."""

    expected = "an object"

    def __init__(self, key: str, variants: Mapping[str, Node], *, default: str | None = None,
                 open_: bool = False) -> None:
        self.key, self.variants = key, dict(variants)
        self.default, self.open = default, open_

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _build(self) -> Validator:
        key, default, open_ = self.key, self.default, self.open
        variants = {tag: node.fast() for tag, node in self.variants.items()}

        def valid(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            tag = value.get(key, default)
            if not isinstance(tag, str):
                return False
            variant = variants.get(tag)
            return open_ if variant is None else variant(value)
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, dict):
            return wrong_type(path, self.expected, value)
        where = _join(path, self.key)
        tag = value.get(self.key, self.default)
        if tag is None:
            return missing_parameter(where)
        if not isinstance(tag, str):
            return wrong_type(where, "a string", tag)
        variant = self.variants.get(tag)
        if variant is None:
            return None if self.open else invalid_value(where, tag, tuple(self.variants))
        return variant.check(value, path)


class Homogeneous(Node):
    """`prompt` and `input`: a string, or a non-empty array whose items all have the type of
    its first item, one of `items` (strings, token ids, ...), never mixed."""

    def __init__(self, *items: Node, expected: str, max_items: int | None = None) -> None:
        self.items, self.expected, self.max_items = items, expected, max_items

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str | list)

    def _build(self) -> Validator:
        items = [(item.accepts, item.fast()) for item in self.items]
        most = self.max_items

        def valid(value: Any) -> bool:
            if isinstance(value, str):
                return True
            if not isinstance(value, list) or not value or (
                    most is not None and len(value) > most):
                return False
            first = value[0]
            item = next((fast for accepts, fast in items if accepts(first)), items[0][1])
            for element in value:  # noqa: SIM110 (a loop: no generator frame per line)
                if not item(element):
                    return False
            return True
        return valid

    def check(self, value: Any, path: str) -> Problem | None:
        if isinstance(value, str):
            return None
        if not isinstance(value, list):
            return wrong_type(path, self.expected, value)
        problem = _length(value, path, 1, self.max_items)
        if problem is not None:
            return problem
        item = next((i for i in self.items if i.accepts(value[0])), self.items[0])
        for i, element in enumerate(value):
            problem = item.check(element, f"{path}[{i}]")
            if problem is not None:
                return problem
        return None


_STRING = Str()
_ANY_OBJECT = Obj()
_BOOL = Bool()
_TOKEN_ID = Int(0)
_TOKEN_IDS = Arr(_TOKEN_ID, min_length=1, expected="an array of integers")


def _tokens(max_items: int | None = None) -> Homogeneous:
    return Homogeneous(_STRING, _TOKEN_ID, _TOKEN_IDS, max_items=max_items,
                       expected="one of a string, array of strings, array of integers, or "
                                "array of arrays of integers")


# -- shared fields --------------------------------------------------------------------------

#: OpenAI's metadata: at most 16 string values, keys up to 64 and values up to 512 chars.
_METADATA = Map(Str(max_length=512), max_items=16, max_key_length=64)
_STOP = OneOf(_STRING, Arr(_STRING, max_length=4, expected="an array of strings"),
              expected="one of a string or array of strings")
_TOOL_CHOICE = OneOf(Str(enum=("none", "auto", "required")), Obj(required=("type",)),
                     expected="one of a string or object")
_SAMPLING: dict[str, Node] = {
    "temperature": Num(0, 2), "top_p": Num(0, 1),
    "presence_penalty": Num(-2, 2), "frequency_penalty": Num(-2, 2),
    "logit_bias": Map(Int(-100, 100)), "seed": Int(), "n": Int(1, 128),
    "stop": _STOP, "stream": _BOOL, "stream_options": Obj({"include_usage": _BOOL}),
    "user": _STRING, "metadata": _METADATA,
}


# -- /v1/chat/completions ---------------------------------------------------------------

_TEXT_PART = Obj({"text": _STRING}, required=("text",))
_IMAGE_PART = Obj({"image_url": Obj({
    "url": _STRING, "detail": Str(enum=("auto", "low", "high", "original"))},
    required=("url",))}, required=("image_url",))
_AUDIO_PART = Obj({"input_audio": Obj({
    "data": _STRING, "format": Str(enum=("wav", "mp3"))}, required=("data", "format"))},
    required=("input_audio",))
_FILE_PART = Obj({"file": Obj({"file_data": _STRING, "file_id": _STRING,
                               "filename": _STRING})}, required=("file",))
_REFUSAL_PART = Obj({"refusal": _STRING}, required=("refusal",))


def _content(parts: Mapping[str, Node]) -> OneOf:
    return OneOf(_STRING, Arr(Tagged("type", parts), min_length=1,
                              expected="an array of objects"),
                 expected="one of a string or array of objects")


_TEXT_CONTENT = _content({"text": _TEXT_PART})
_TOOL_CALL = Tagged("type", {
    "function": Obj({"id": _STRING, "function": Obj({"name": _STRING, "arguments": _STRING},
                                                    required=("name", "arguments"))},
                    required=("id", "function")),
    "custom": Obj({"id": _STRING, "custom": Obj({"name": _STRING, "input": _STRING},
                                                required=("name", "input"))},
                  required=("id", "custom")),
})
_CHAT_MESSAGE = Tagged("role", {
    # In the order the hosted API lists them.
    "system": Obj({"content": _TEXT_CONTENT, "name": _STRING}, required=("content",)),
    "assistant": Obj({
        "content": OneOf(_STRING, Arr(Tagged("type", {"text": _TEXT_PART,
                                                      "refusal": _REFUSAL_PART}),
                                      expected="an array of objects"),
                         expected="one of a string or array of objects"),
        "name": _STRING, "refusal": _STRING,
        "tool_calls": Arr(_TOOL_CALL, expected="an array of objects"),
        "function_call": Obj({"name": _STRING, "arguments": _STRING},
                             required=("name", "arguments")),
        "audio": Obj(required=("id",))}),
    "user": Obj({"content": _content({"text": _TEXT_PART, "image_url": _IMAGE_PART,
                                      "input_audio": _AUDIO_PART, "file": _FILE_PART}),
                 "name": _STRING}, required=("content",)),
    "function": Obj({"content": Nullable(_STRING), "name": _STRING},
                    required=("content", "name")),
    "tool": Obj({"content": _TEXT_CONTENT, "tool_call_id": _STRING},
                required=("content", "tool_call_id")),
    "developer": Obj({"content": _TEXT_CONTENT, "name": _STRING}, required=("content",)),
})
_CHAT_TOOL = Tagged("type", {
    "function": Obj({"function": Obj({"name": _STRING, "description": _STRING,
                                      "parameters": _ANY_OBJECT, "strict": _BOOL},
                                     required=("name",))}, required=("function",)),
    "custom": Obj({"custom": Obj({"name": _STRING, "description": _STRING,
                                  "format": _ANY_OBJECT}, required=("name",))},
                  required=("custom",)),
})
_RESPONSE_FORMAT = Tagged("type", {
    "text": _ANY_OBJECT, "json_object": _ANY_OBJECT,
    "json_schema": Obj({"json_schema": Obj({
        "name": Str(min_length=1, max_length=64), "description": _STRING,
        "schema": _ANY_OBJECT, "strict": _BOOL}, required=("name",))},
        required=("json_schema",)),
})
_CHAT_BODY = Obj({
    "model": _STRING,
    "messages": Arr(_CHAT_MESSAGE, min_length=1, expected="an array of objects"),
    **_SAMPLING,
    "max_tokens": Int(1), "max_completion_tokens": Int(1),
    "logprobs": _BOOL, "top_logprobs": Int(0, 20),
    "response_format": _RESPONSE_FORMAT,
    "tools": Arr(_CHAT_TOOL, expected="an array of objects"),
    "tool_choice": _TOOL_CHOICE, "parallel_tool_calls": _BOOL,
    "functions": Arr(Obj({"name": _STRING, "description": _STRING,
                          "parameters": _ANY_OBJECT}, required=("name",)),
                     min_length=1, expected="an array of objects"),
    "function_call": OneOf(Str(enum=("none", "auto")), Obj({"name": _STRING},
                                                            required=("name",)),
                           expected="one of a string or object"),
    "store": _BOOL, "modalities": Arr(Str(enum=("text", "audio")),
                                      expected="an array of strings"),
    "audio": _ANY_OBJECT, "prediction": _ANY_OBJECT, "web_search_options": _ANY_OBJECT,
    "reasoning_effort": _STRING, "service_tier": _STRING, "verbosity": _STRING,
    "prompt_cache_key": _STRING, "safety_identifier": _STRING,
}, required=("model", "messages"))


# -- /v1/completions and /v1/embeddings ------------------------------------------------

_COMPLETIONS_BODY = Obj({
    "model": _STRING, "prompt": _tokens(), **_SAMPLING,
    "max_tokens": Int(0), "best_of": Int(0, 20), "echo": _BOOL, "logprobs": Int(0, 5),
    "suffix": _STRING,
}, required=("model", "prompt"))

#: The hosted API takes at most 2048 inputs in one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
_EMBEDDINGS_BODY = Obj({
    "model": _STRING, "input": _tokens(MAX_EMBEDDING_INPUTS),
    "encoding_format": Str(enum=("float", "base64")), "dimensions": Int(1), "user": _STRING,
}, required=("model", "input"))


# -- /v1/moderations ----------------------------------------------------------------------

_MODERATION_PART = Tagged("type", {
    "text": Obj({"text": _STRING}, required=("text",)),
    "image_url": Obj({"image_url": Obj({"url": _STRING}, required=("url",))},
                     required=("image_url",)),
})
_MODERATIONS_BODY = Obj({
    "model": _STRING,
    "input": Homogeneous(_STRING, _MODERATION_PART, expected="one of a string, array of "
                                                             "strings, or array of objects"),
}, required=("model", "input"))


# -- /v1/responses ------------------------------------------------------------------------

_INPUT_TEXT = Obj({"text": _STRING}, required=("text",))
_INPUT_IMAGE = Obj({"image_url": _STRING, "file_id": _STRING,
                    "detail": Str(enum=("low", "high", "auto", "original"))})
_INPUT_FILE = Obj({"file_data": _STRING, "file_id": _STRING, "file_url": _STRING,
                   "filename": _STRING})
_OUTPUT_TEXT = Obj({"text": _STRING, "annotations": Arr(_ANY_OBJECT)}, required=("text",))
_INPUT_PARTS = {"input_text": _INPUT_TEXT, "input_image": _INPUT_IMAGE,
                "input_file": _INPUT_FILE}


def _message_item(parts: Mapping[str, Node]) -> Obj:
    return Obj({"content": _content(parts), "type": Str(enum=("message",)),
                "status": _STRING}, required=("content",))


_MESSAGE_ITEM = Tagged("role", {
    "user": _message_item(_INPUT_PARTS),
    "assistant": _message_item({**_INPUT_PARTS, "output_text": _OUTPUT_TEXT,
                                "refusal": _REFUSAL_PART}),
    "system": _message_item(_INPUT_PARTS),
    "developer": _message_item(_INPUT_PARTS),
})
#: Every input item type of the Responses API (openai 3.57's `ResponseInputItemParam`);
#: those the checks below do not spell out are only required to be objects.
_ITEM_TYPES = (
    "message", "file_search_call", "computer_call", "computer_call_output", "web_search_call",
    "function_call", "function_call_output", "tool_search_call", "tool_search_output",
    "additional_tools", "configuration_update", "reasoning", "compaction",
    "image_generation_call", "code_interpreter_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
    "apply_patch_call_output", "mcp_list_tools", "mcp_approval_request",
    "mcp_approval_response", "mcp_call", "custom_tool_call_output", "custom_tool_call",
    "compaction_trigger", "item_reference", "program", "program_output",
)
_ITEMS: dict[str, Node] = {
    **dict.fromkeys(_ITEM_TYPES, _ANY_OBJECT),
    "message": _MESSAGE_ITEM,
    "function_call": Obj({"call_id": _STRING, "name": _STRING, "arguments": _STRING,
                          "id": _STRING, "status": _STRING},
                         required=("call_id", "name", "arguments")),
    "function_call_output": Obj({"call_id": _STRING, "output": OneOf(
        _STRING, Arr(_ANY_OBJECT, expected="an array of objects"),
        expected="one of a string or array of objects")}, required=("call_id", "output")),
    "reasoning": Obj({"id": _STRING, "summary": Arr(_ANY_OBJECT)}, required=("summary",)),
    "item_reference": Obj({"id": _STRING}, required=("id",)),
}
_RESPONSE_TOOL = Tagged("type", {
    "function": Obj({"name": _STRING, "description": _STRING,
                     "parameters": Nullable(_ANY_OBJECT), "strict": Nullable(_BOOL)},
                    required=("name",)),
}, open_=True)
_TEXT_FORMAT = Tagged("type", {
    "text": _ANY_OBJECT, "json_object": _ANY_OBJECT,
    "json_schema": Obj({"name": Str(min_length=1, max_length=64), "schema": _ANY_OBJECT,
                        "description": _STRING, "strict": _BOOL},
                       required=("name", "schema")),
})
_RESPONSES_BODY = Obj({
    "model": _STRING,
    "input": OneOf(_STRING, Arr(Tagged("type", _ITEMS, default="message"), min_length=1,
                                expected="an array of objects"),
                   expected="one of a string or array of objects"),
    "instructions": _STRING,
    # The hosted API's floor: fewer than 16 output tokens is refused.
    "max_output_tokens": Int(16),
    "temperature": Num(0, 2), "top_p": Num(0, 1), "top_logprobs": Int(0, 20),
    "text": Obj({"format": _TEXT_FORMAT, "verbosity": _STRING}),
    "tools": Arr(_RESPONSE_TOOL, expected="an array of objects"),
    "tool_choice": _TOOL_CHOICE, "parallel_tool_calls": _BOOL, "max_tool_calls": Int(1),
    "store": _BOOL, "background": _BOOL, "stream": _BOOL, "metadata": _METADATA,
    "previous_response_id": _STRING, "conversation": OneOf(
        _STRING, _ANY_OBJECT, expected="one of a string or object"),
    "reasoning": Obj({"effort": _STRING, "summary": _STRING}),
    "truncation": Str(enum=("auto", "disabled")),
    "include": Arr(_STRING, expected="an array of strings"),
    "user": _STRING, "service_tier": _STRING, "prompt": _ANY_OBJECT,
    "prompt_cache_key": _STRING, "safety_identifier": _STRING,
}, required=("model", "input"))


# -- the registry ------------------------------------------------------------------------

SCHEMAS: dict[str, Obj] = {
    CHAT: _CHAT_BODY,
    COMPLETIONS: _COMPLETIONS_BODY,
    EMBEDDINGS: _EMBEDDINGS_BODY,
    RESPONSES: _RESPONSES_BODY,
    MODERATIONS: _MODERATIONS_BODY,
}
#: How the Batch API's messages name each endpoint ("Chat Completions: Streaming is not
#: supported in the Batch API." is the hosted wording; the others follow it).
TITLES = {CHAT: "Chat Completions", COMPLETIONS: "Completions", EMBEDDINGS: "Embeddings",
          RESPONSES: "Responses", MODERATIONS: "Moderations"}


def required(endpoint: str) -> tuple[str, ...]:
    """The body fields a line for `endpoint` must have; `model` for any other endpoint,
    since it routes the line."""
    schema = SCHEMAS.get(canonical_endpoint(endpoint))
    return schema.required if schema is not None else ("model",)


def missing(endpoint: str, body: Mapping[str, Any]) -> list[str]:
    """The required body fields that are absent or null, in schema order."""
    return [name for name in required(endpoint) if body.get(name) is None]


def check(endpoint: str, body: Any) -> Problem | None:
    """The first problem with a line's body, or None (also for endpoints without a schema
    here, which their backends check)."""
    schema = SCHEMAS.get(canonical_endpoint(endpoint))
    return None if schema is None or schema.valid(body) else schema.check(body, "")
