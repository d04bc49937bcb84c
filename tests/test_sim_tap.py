"""`twistd ollamaflow-sim`: options, the plugin and the service it makes."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.plugin import getPlugins
from twisted.python import usage

from ollamaflow.sim.service import SimulatorService
from ollamaflow.sim.tap import Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    options = parse()
    assert options["port"] == 11435 and options["interface"] == "127.0.0.1"
    assert options["models"] == ("llama3", "all-minilm")
    config = options.config
    assert (config.tokens, config.tokens_per_second, config.num_parallel, config.max_queue) == (
        20,
        20.0,
        1,
        512,
    )
    assert "mistral" in config.pullable and config.keep_alive == 300.0
    assert not (config.refuse or config.error500 or config.hang)


def test_all_options() -> None:
    options = parse(
        "--port=0",
        "--models=phi3, qwen2.5:0.5b",
        "--pullable=*",
        "--tokens=5",
        "--tokens-per-second=0",
        "--ttft=0",
        "--load-time=0",
        "--keep-alive=-1",
        "--num-parallel=4",
        "--max-queue=8",
        "--pull-time=0",
        "--push-time=0.5",
        "--create-time=0.25",
        "--fault=error500",
        "--fault=hang",
        "--drop-after=3",
        "--stall-after=2",
        "--stall-seconds=1.5",
        "--no-host-check",
    )
    config = options.config
    assert options["models"] == ("phi3", "qwen2.5:0.5b")
    assert config.pullable == ("*",) and config.keep_alive == -1.0
    assert (config.num_parallel, config.max_queue, config.tokens) == (4, 8, 5)
    assert config.error500 and config.hang and not config.refuse and not config.check_host
    assert (config.drop_mid_stream_after, config.stall_after, config.stall_seconds) == (3, 2, 1.5)
    assert (config.push_time, config.create_time) == (0.5, 0.25)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port=http"],
        ["--port=70000"],
        ["--tokens=-1"],
        ["--num-parallel=0"],
        ["--max-queue=0"],
        ["--ttft=-2"],
        ["--keep-alive=soon"],
        ["--fault=explode"],
        ["--models=bad name"],
        ["--stall-after=-1"],
        ["--push-time=-1"],
        ["--create-time=-1"],
        ["--bogus"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_plugin_is_registered() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["ollamaflow-sim"].options is Options


@pytest_twisted.ensureDeferred
async def test_service_starts_and_stops() -> None:
    options = parse("--port=0", "--models=llama3", "--tokens-per-second=0", "--ttft=0")
    service = makeService(options)
    assert isinstance(service, SimulatorService)
    service.startService()
    try:
        sim = service.simulator
        assert sim is not None
        response = await treq.get(sim.url + "/api/tags", persistent=False)
        models = json.loads(await treq.content(response))["models"]
        assert [m["name"] for m in models] == ["llama3:latest"]
    finally:
        stopped = service.stopService()
        assert stopped is not None
        await stopped
    assert service.simulator is None
    assert reactor.running
