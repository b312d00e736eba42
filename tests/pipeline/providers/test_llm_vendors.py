"""Every remote LLM vendor against a fake speaking its wire protocol (real HTTP on 127.0.0.1): streamed
text, a tool call, a refused key, a rate limit with retry-after, a server error, a stream cut mid-way,
a hang past the timeout; and each one configured through Config (key variable, base URL, default model)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.config import Config
from pipeline.providers import PROVIDERS, ProviderSettings, build_llm
from pipeline.providers.anthropic import AnthropicLLM
from pipeline.providers.base import LLMProvider, ProviderError, Tool, ToolCall, ToolExchange, ToolResult
from pipeline.providers.google import GeminiLLM
from pipeline.providers.openai import OpenAILLM
from tests.fakes._llm import LLMFake, Reply
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.asyncio

KEY = "vendor-secret-key-123"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
REPLY = "Hello there, how can I help you today?"
TOOL = Tool("transfer_call", "Transfer the caller", {"type": "object", "properties": {"target": {"type": "string"}}})


@dataclass(frozen=True)
class Vendor:
    """How to run one vendor's fake and drive its failure modes."""

    name: str
    cls: type
    fake: Callable[..., Any]             # (api_key=..., replies=...) -> async context manager

    @contextlib.asynccontextmanager
    async def running(self, replies: list[Reply] | tuple[Reply, ...] = (REPLY,),
                      key: str = KEY) -> AsyncIterator[tuple[Any, ProviderSettings]]:
        async with self.fake(api_key=KEY, replies=replies) as fake:
            settings = ProviderSettings(self.name, PROVIDERS[self.name].default_models["llm"], key, fake.base_url,
                                        key_env=PROVIDERS[self.name].key_env)
            yield fake, settings

    def fail(self, fake: Any, mode: str) -> None:
        if isinstance(fake, LLMFake):
            fake.state.fail = mode
        else:
            fake.state.fail["llm"] = mode

    def bodies(self, fake: Any) -> list[dict[str, Any]]:
        import json
        return fake.state.llm_requests if isinstance(fake, FakeOpenAI) else \
            [json.loads(r["body"]) for r in fake.state.requests]


VENDORS = {v.name: v for v in (
    Vendor("anthropic", AnthropicLLM, FakeAnthropic),
    Vendor("google", GeminiLLM, FakeGemini),
    *(Vendor(name, OpenAILLM, FakeOpenAI) for name in ("xai", "together", "fireworks", "openrouter")),
)}
vendors = pytest.mark.parametrize("vendor", list(VENDORS.values()), ids=list(VENDORS))


async def collect(llm: LLMProvider, tools: tuple[Tool, ...] = ()) -> list[str | ToolCall]:
    return [item async for item in llm.stream(MESSAGES, tools)]


async def failure(vendor: Vendor, mode: str, *, key: str = KEY, timeout_s: float = 5) -> tuple[ProviderError, list[Any]]:
    """The error ``mode`` causes, and what was yielded before it."""
    got: list[Any] = []
    async with vendor.running(key=key) as (fake, settings), aiohttp.ClientSession() as http:
        vendor.fail(fake, mode)
        with pytest.raises(ProviderError) as err:
            async for item in build_llm(settings, http, timeout_s=timeout_s).stream(MESSAGES):
                got.append(item)
    assert KEY not in str(err.value) and "wrong-key" not in str(err.value)
    return err.value, got


@vendors
async def test_streams_the_answer_in_deltas(vendor: Vendor) -> None:
    async with vendor.running() as (fake, settings), aiohttp.ClientSession() as http:
        llm = build_llm(settings, http, timeout_s=5, max_tokens=77)
        assert isinstance(llm, vendor.cls)
        deltas = await collect(llm)
    assert len(deltas) > 3 and "".join(map(str, deltas)) == REPLY
    assert len(vendor.bodies(fake)) == 1


@vendors
async def test_a_tool_call_comes_after_the_text(vendor: Vendor) -> None:
    reply = {"content": "Let me transfer you.", "tool_calls": [{"name": "transfer_call", "arguments": {"target": "sales"}}]}
    async with vendor.running([reply]) as (_fake, settings), aiohttp.ClientSession() as http:
        items = await collect(build_llm(settings, http, timeout_s=5), (TOOL,))
    assert "".join(i for i in items if isinstance(i, str)) == "Let me transfer you."
    call = items[-1]
    assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("transfer_call", {"target": "sales"})
    assert call.id                                   # the vendor's id, which the result must name


@vendors
async def test_tool_results_go_back_in_the_vendors_shape_and_the_model_answers(vendor: Vendor) -> None:
    """The second request carries the model's call and our result (a fake refuses a wrongly shaped one)."""
    ask = {"content": "Let me check.", "tool_calls": [{"name": "lookup", "arguments": {"ref": "AB12"}},
                                                      {"name": "lookup", "arguments": {"ref": "CD34"}}]}
    tool = Tool("lookup", "Look a booking up", {"type": "object", "properties": {"ref": {"type": "string"}}})
    async with vendor.running([ask, "It is confirmed."]) as (fake, settings), aiohttp.ClientSession() as http:
        llm = build_llm(settings, http, timeout_s=5)
        first = [item async for item in llm.stream(MESSAGES, (tool,))]
        calls = [i for i in first if isinstance(i, ToolCall)]
        exchange = ToolExchange(tuple(ToolResult(c, f"booking {c.arguments['ref']} confirmed") for c in calls))
        context = [*MESSAGES, {"role": "assistant", "content": "Let me check."}, exchange]
        answer = "".join([str(i) async for i in llm.stream(context, (tool,))])
    assert answer == "It is confirmed."
    body = vendor.bodies(fake)[1]
    ids = [c.id for c in calls]
    if vendor.cls is OpenAILLM:
        assistant, *results = body["messages"][2:]
        assert assistant["content"] == "Let me check." and [c["id"] for c in assistant["tool_calls"]] == ids
        assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [{"ref": "AB12"}, {"ref": "CD34"}]
        assert results == [{"role": "tool", "tool_call_id": ids[0], "content": "booking AB12 confirmed"},
                           {"role": "tool", "tool_call_id": ids[1], "content": "booking CD34 confirmed"}]
    elif vendor.cls is AnthropicLLM:
        assistant, results = body["messages"][1:]
        assert assistant["content"][0] == {"type": "text", "text": "Let me check."}
        assert [(b["type"], b["id"], b["input"]) for b in assistant["content"][1:]] == [
            ("tool_use", ids[0], {"ref": "AB12"}), ("tool_use", ids[1], {"ref": "CD34"})]
        assert results == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": ids[0], "content": "booking AB12 confirmed"},
            {"type": "tool_result", "tool_use_id": ids[1], "content": "booking CD34 confirmed"}]}
    else:
        model, results = body["contents"][1:]
        assert model["parts"][0] == {"text": "Let me check."}
        assert [p["functionCall"] for p in model["parts"][1:]] == [
            {"id": ids[0], "name": "lookup", "args": {"ref": "AB12"}}, {"id": ids[1], "name": "lookup", "args": {"ref": "CD34"}}]
        assert results == {"role": "user", "parts": [
            {"functionResponse": {"id": ids[0], "name": "lookup", "response": {"result": "booking AB12 confirmed"}}},
            {"functionResponse": {"id": ids[1], "name": "lookup", "response": {"result": "booking CD34 confirmed"}}}]}


BAD_TOOL_RESULTS = {   # a result that answers no call of the message before it
    "anthropic": ("/v1/messages", {"model": "m", "max_tokens": 10, "stream": True, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]}),
    "google": ("/v1beta/models/m:streamGenerateContent?alt=sse", {"contents": [
        {"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "Checking."}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "lookup", "response": {"result": "ok"}}}]}]}),
    "xai": ("/chat/completions", {"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking."},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]}),
}


@pytest.mark.parametrize("name", list(BAD_TOOL_RESULTS))
async def test_the_fakes_refuse_a_tool_result_without_its_call(name: str) -> None:
    vendor, (path, body) = VENDORS[name], BAD_TOOL_RESULTS[name]
    headers = {"authorization": f"Bearer {KEY}", "x-api-key": KEY, "x-goog-api-key": KEY,
               "anthropic-version": "2023-06-01"}
    async with vendor.running() as (fake, _settings), aiohttp.ClientSession() as http:
        async with http.post(fake.base_url.rstrip("/") + path, json=body, headers=headers) as response:
            assert response.status == 400, await response.text()


@vendors
async def test_a_refused_key_is_permanent_and_names_the_key_variable(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "", key="wrong-key")
    assert error.transient is False and PROVIDERS[vendor.name].key_env in str(error)


@vendors
async def test_a_rate_limit_is_transient_with_the_retry_delay(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "429")
    assert error.transient is True and error.retry_after == 3.0 and "429" in str(error)


@vendors
async def test_a_server_error_is_transient(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "500")
    assert error.transient is True and "500" in str(error)


@vendors
@pytest.mark.parametrize("mode", ["cut", "truncate"])
async def test_a_stream_cut_mid_way_is_an_error_after_some_text(vendor: Vendor, mode: str) -> None:
    error, got = await failure(vendor, mode)
    assert error.transient is True and got      # "truncate" ends cleanly after all the text, without the closing event
    assert mode == "truncate" or "".join(got) != REPLY


@vendors
async def test_a_hang_past_the_timeout_is_transient(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "hang", timeout_s=0.3)
    assert error.transient is True and "timed out" in str(error)


@vendors
async def test_configured_through_config_with_its_key_variable(vendor: Vendor) -> None:
    spec = PROVIDERS[vendor.name]
    async with vendor.running() as (fake, _settings), aiohttp.ClientSession() as http:
        config = Config.from_mapping({"provider": "local", "llm_provider": vendor.name,
                                      "base_urls": {vendor.name: fake.base_url}}, {spec.key_env: KEY})
        settings = config.providers.llm
        assert (settings.name, settings.model, settings.api_key) == (vendor.name, spec.default_models["llm"], KEY)
        assert "".join(map(str, await collect(build_llm(settings, http, timeout_s=5)))) == REPLY


# ------------------------------------------------------------------------------------- vendor details

async def test_anthropic_sends_the_system_prompt_apart_and_its_headers() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello, Acme here."},
                {"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]
    async with FakeAnthropic(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        llm = AnthropicLLM(ProviderSettings("anthropic", "claude-3-5-sonnet-20241022", KEY, fake.base_url), http,
                           timeout_s=5)
        assert [d async for d in llm.stream(messages, [TOOL])] == ["Hello!"]
    [request] = fake.state.requests
    assert request["path"] == "/v1/messages" and request["headers"]["anthropic-version"] == "2023-06-01"
    assert request["headers"]["x-api-key"] == KEY and "authorization" not in request["headers"]
    body = VENDORS["anthropic"].bodies(fake)[0]
    assert body["system"] == "Be brief." and body["max_tokens"] == 1024 and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "(the call has started)"},
                                {"role": "assistant", "content": "Hello, Acme here."},
                                {"role": "user", "content": "hi\nanyone?"}]
    assert body["tools"] == [{"name": "transfer_call", "description": "Transfer the caller",
                              "input_schema": dict(TOOL.parameters)}]


async def test_anthropic_overloaded_in_the_stream_is_transient() -> None:
    error, got = await failure(VENDORS["anthropic"], "overloaded")
    assert error.transient is True and "overloaded_error" in str(error) and got == []


async def test_gemini_request_shape() -> None:
    async with FakeGemini(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        llm = GeminiLLM(ProviderSettings("google", "gemini-2.5-flash", KEY, fake.base_url), http, timeout_s=5,
                        max_tokens=120)
        assert [d async for d in llm.stream(MESSAGES + [{"role": "assistant", "content": "Hi!"},
                                                        {"role": "user", "content": "bye"}], [TOOL])] == ["Hello!"]
    [request] = fake.state.requests
    assert request["path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert request["query"] == {"alt": "sse"} and request["headers"]["x-goog-api-key"] == KEY
    body = VENDORS["google"].bodies(fake)[0]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [("user", "hi"), ("model", "Hi!"),
                                                                               ("user", "bye")]
    assert body["tools"] == [{"functionDeclarations": [{"name": "transfer_call", "description": "Transfer the caller",
                                                        "parametersJsonSchema": dict(TOOL.parameters)}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 120}


async def test_gemini_missing_key_is_refused_too() -> None:
    error, _ = await failure(VENDORS["google"], "", key="")
    assert error.transient is False and "GOOGLE_API_KEY" in str(error) and "403" in str(error)


async def test_gemini_key_falls_back_to_gemini_api_key_and_xai_answers_to_grok() -> None:
    config = Config.from_mapping({"provider": "local", "llm_provider": "google"}, {"GEMINI_API_KEY": "g-1"})
    assert (config.providers.llm.api_key, config.providers.llm.base_url) == \
        ("g-1", "https://generativelanguage.googleapis.com")
    both = Config.from_mapping({"provider": "local", "llm_provider": "google"},
                               {"GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"})
    assert both.providers.llm.api_key == "g-2"
    grok = Config.from_mapping({"provider": "local", "llm_provider": "grok", "api_keys": {"grok": "x-1"}})
    assert (grok.providers.llm.name, grok.providers.llm.model, grok.providers.llm.api_key) == ("xai", "grok-2", "x-1")
    assert grok.providers.llm.base_url == "https://api.x.ai/v1"
