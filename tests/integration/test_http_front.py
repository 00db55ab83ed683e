"""The OpenAI-compatible HTTP front, driven by the official `openai` package over a real
swarm (real gRPC, mTLS, the real TinyStories weights): temperature 0 streams exactly the
gRPC greedy tokens; every bad request gets OpenAI's error shape and leaves no session
behind on any stage; a client that hangs up mid-stream cancels its generation."""

import asyncio
import http.client
import json
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest

from shard.client import generate
from shard.services.coordinator.http import HttpServer, OpenAIFront
from shard.v1 import api_pb2

from support.swarm import inprocess_swarm

KEY = "sk-shard-test-key"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def model_dir(tinystories_dir, tmp_path_factory):
    """TinyStories with a chat template added (it ships none), so chat has one to apply."""
    target = tmp_path_factory.mktemp("model") / "tinystories-chat"
    shutil.copytree(tinystories_dir, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("swarm")
    (workdir / "keys").write_text(f"# the test's key\n\n{KEY}\n")
    loop = asyncio.new_event_loop()
    context = inprocess_swarm(model_dir, 2, workdir, coordinator_args=[
        "--http-listen", "127.0.0.1:0", "--api-key-file", str(workdir / "keys")])
    swarm = loop.run_until_complete(context.__aenter__())
    swarm.run = loop.run_until_complete
    swarm.url = f"http://{swarm.coordinator.http_address}/v1"
    yield swarm
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


def client(swarm, key=KEY, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=swarm.url, api_key=key, max_retries=0, **kwargs)


def grpc_greedy(swarm, max_tokens, **prompt):
    """The gRPC API's greedy generation of the same prompt: the yardstick."""
    request = api_pb2.GenerateRequest(max_tokens=max_tokens, **prompt)
    return swarm.run(generate(swarm.coordinator.address, swarm.tls(), request)).summary


def no_sessions_left(swarm) -> None:
    """Within 10 s, no stage holds a session and the coordinator runs no generation."""
    deadline = time.monotonic() + 10
    while True:
        held = {stage.node.node_id: [s.session_id for s in stage.node.info().sessions] for stage in swarm.stages}
        running = swarm.coordinator.node.admission.running
        if not any(held.values()) and not running:
            return
        assert time.monotonic() < deadline, f"sessions left behind: {held}, {running} running"
        swarm.run(asyncio.sleep(0.05))


def test_models_lists_the_served_model(swarm):
    models = swarm.run(client(swarm).models.list())
    assert [m.id for m in models.data] == ["tinystories-chat"]


def test_streamed_chat_at_temperature_0_is_the_grpc_greedy_output(swarm):
    expected = grpc_greedy(swarm, 24, chat=api_pb2.ChatMessages(
        messages=[api_pb2.ChatMessage(**m) for m in MESSAGES]))

    async def stream():
        chunks = await client(swarm).chat.completions.create(
            model="tinystories-chat", messages=MESSAGES, temperature=0, max_completion_tokens=24, stream=True,
            stream_options={"include_usage": True})
        return [chunk async for chunk in chunks]

    chunks = swarm.run(stream())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and text
    [finish] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ("stop" if expected.finish_reason == api_pb2.FINISH_REASON_EOS else "length")
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_ids), len(expected.output_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    no_sessions_left(swarm)


def test_completion_at_temperature_0_is_the_grpc_greedy_output_streamed_or_whole(swarm):
    expected = grpc_greedy(swarm, 20, prompt="Once upon a time", stop_at_eos=False)

    async def both():
        api = client(swarm)
        chunks = await api.completions.create(model="tinystories-chat", prompt="Once upon a time", temperature=0,
                                              max_tokens=20, stream=True, extra_body={"ignore_eos": True})
        streamed = "".join([c.choices[0].text async for c in chunks])
        whole = await api.completions.create(model="tinystories-chat", prompt="Once upon a time", temperature=0,
                                             max_tokens=20, extra_body={"ignore_eos": True, "draft": "ngram",
                                                                        "spec_k": 3})
        return streamed, whole

    streamed, whole = swarm.run(both())
    assert streamed == whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == len(expected.output_ids) == 20
    assert whole.model_extra["shard"]["spec_k"] == 3  # the extensions reached the engine: speculation
    no_sessions_left(swarm)


def test_logprobs_in_openais_shapes_whole_and_streamed(swarm):
    """At temperature 0 the chosen token is the most likely one: its logprob leads the
    alternatives; one entry per generated token, in chat's and in completions' shape."""
    async def both():
        api = client(swarm)
        chat = await api.chat.completions.create(model="tinystories-chat", messages=MESSAGES, temperature=0,
                                                 max_completion_tokens=12, logprobs=True, top_logprobs=3)
        chunks = await api.completions.create(model="tinystories-chat", prompt="Once upon a time", temperature=0,
                                              max_tokens=12, logprobs=2, stream=True, extra_body={"ignore_eos": True})
        return chat, [c async for c in chunks]

    chat, chunks = swarm.run(both())
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and "".join(c.token for c in content) == \
        chat.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    tokens = [t for lp in streamed for t in lp.tokens]
    assert len(tokens) == 12 and "".join(tokens) == "".join(c.choices[0].text for c in chunks if c.choices)
    for lp in streamed:
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert len(top) == 2 and top[token] == logprob == max(top.values())
    no_sessions_left(swarm)


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "gpt-4o", "messages": MESSAGES}, 404, "gpt-4o"),
    ({"model": "tinystories-chat", "messages": []}, 400, "messages"),
    ({"model": "tinystories-chat", "messages": MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tinystories-chat", "messages": MESSAGES, "temperature": 0, "max_completion_tokens": 10**9}, 400, "context"),
    ({"model": "tinystories-chat", "messages": MESSAGES, "temperature": 0, "n": 2}, 400, "n"),
    ({"model": "tinystories-chat", "messages": MESSAGES, "temperature": 0, "spec_k": 9999}, 400, "spec_k"),
    ({"model": "tinystories-chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tinystories-chat", "messages": "hello"}, 400, "messages"),
    ({"model": "tinystories-chat", "messages": MESSAGES, "temperature": 0, "top_p": 0.5}, 400, "top_p"),
])
def test_bad_chat_requests_get_openai_errors_and_leave_nothing(swarm, body, status, needle):
    with pytest.raises(openai.APIStatusError) as caught:
        swarm.run(client(swarm).post("/chat/completions", body=body, cast_to=object))
    assert caught.value.status_code == status
    error = caught.value.body
    assert set(error) >= {"message", "type", "param", "code"} and needle in error["message"]
    no_sessions_left(swarm)


def raw(swarm, path, data: bytes, key=KEY, method="POST"):
    """A request the openai package would not send (bad JSON): status and JSON body."""
    request = urllib.request.Request(f"{swarm.url}{path}", data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("path, data, status", [
    ("/completions", b'{"model": "tinystories-chat", "prompt": ', 400),
    ("/completions", b"[1, 2]", 400),
    ("/completions", b'{"model": "tinystories-chat", "prompt": "\xff\xfe"}', 400),
    ("/nowhere", b"{}", 404),
])
def test_malformed_bodies_get_openai_errors(swarm, path, data, status):
    code, body = swarm.run(asyncio.to_thread(raw, swarm, path, data))
    assert code == status and set(body["error"]) == {"message", "type", "param", "code"}
    no_sessions_left(swarm)


def declared_only(swarm, path: str, length: int) -> tuple[int, dict]:
    """Headers that declare a `length`-byte body and ask to go on (`Expect: 100-continue`),
    as a careful client does before a large upload: status and JSON body of the answer,
    sent before any of the body. (Sending the body unasked races the refusal: the server
    closes with it unread and the client may see a reset instead of the 413.)"""
    url = urllib.parse.urlsplit(swarm.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest("POST", url.path + path)
        for name, value in {"authorization": f"Bearer {KEY}", "content-type": "application/json",
                            "content-length": str(length), "expect": "100-continue"}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_beyond_the_limit_is_refused_before_it_is_read(swarm):
    limit = 6 * swarm.coordinator.node.max_prompt_chars + (1 << 16)
    code, body = swarm.run(asyncio.to_thread(declared_only, swarm, "/completions", limit + 1))
    assert code == 413 and body["error"]["code"] == "request_too_large"
    no_sessions_left(swarm)


@pytest.mark.parametrize("key", ["sk-wrong", ""])
def test_a_wrong_or_missing_api_key_is_401(swarm, key):
    with pytest.raises(openai.AuthenticationError) as caught:
        swarm.run(client(swarm, key=key or "unused", default_headers={"authorization": key}).completions.create(
            model="tinystories-chat", prompt="Once", temperature=0, max_tokens=2))
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    no_sessions_left(swarm)


def test_a_client_hanging_up_mid_stream_cancels_the_generation(swarm):
    full = 400  # tokens the generation would take, were it not cancelled
    before = [stage.node.info().positions_computed for stage in swarm.stages]

    async def hang_up():
        chunks = await client(swarm).completions.create(
            model="tinystories-chat", prompt="Once upon a time", temperature=0, max_tokens=full, stream=True,
            extra_body={"ignore_eos": True, "draft": "none"})
        async for chunk in chunks:
            if chunk.choices[0].text:
                break
        await chunks.close()  # the connection goes: the server sees a disconnect

    swarm.run(hang_up())
    no_sessions_left(swarm)
    computed = [stage.node.info().positions_computed - b for stage, b in zip(swarm.stages, before)]
    assert all(n < full for n in computed), computed  # it stopped early, not at max_tokens


def test_a_client_hanging_up_on_a_whole_response_cancels_the_generation(swarm):
    """Without a stream the server notices the hang-up while it waits for the result."""
    full = 400
    before = [stage.node.info().positions_computed for stage in swarm.stages]
    body = json.dumps({"model": "tinystories-chat", "prompt": "Once upon a time", "temperature": 0,
                       "max_tokens": full, "ignore_eos": True, "draft": "none"}).encode()
    host, port = swarm.coordinator.http_address.rsplit(":", 1)

    async def hang_up():
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        await writer.drain()
        while not any(stage.node.info().sessions for stage in swarm.stages):  # it is generating
            await asyncio.sleep(0.01)
        writer.close()
        await writer.wait_closed()

    swarm.run(asyncio.wait_for(hang_up(), 30))
    no_sessions_left(swarm)
    computed = [stage.node.info().positions_computed - b for stage, b in zip(swarm.stages, before)]
    assert all(n < full for n in computed), computed


def test_https_with_the_deployments_certificate(swarm):
    """TLS with the coordinator's own certificate; clients trust the deployment's CA."""
    front = OpenAIFront(swarm.coordinator.node, model_name="tinystories-chat", api_keys=frozenset([KEY]))
    server = HttpServer(front.app, "127.0.0.1:0", swarm.tls("coordinator"))

    async def ask():
        await server.start()
        try:
            context = ssl.create_default_context(cafile=str(swarm.certs / "ca.pem"))
            api = openai.AsyncOpenAI(base_url=f"https://localhost:{server.port}/v1", api_key=KEY, max_retries=0,
                                     http_client=openai.DefaultAsyncHttpxClient(verify=context))
            return await api.completions.create(model="tinystories-chat", prompt="Once upon a time",
                                                temperature=0, max_tokens=5)
        finally:
            await server.stop()

    expected = grpc_greedy(swarm, 5, prompt="Once upon a time")
    assert swarm.run(ask()).choices[0].text == expected.text
