"""The Node `openai` SDK through the gateway (issue 15): its embeddings, which it asks for in
base64 by default and decodes itself, come out as the same floats the Python SDK reads
(the `mock` provider once ignored `encoding_format` and the Node SDK decoded its float list
as `[0, 0]`). Needs Node; the SDK is installed from the npm registry once, into a cache
outside the repository. Without Node the test skips; without the registry it skips too,
except under CI=true, where it fails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

NODE = shutil.which("node")
NPM = shutil.which("npm")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmproxy-tests" / "node-openai"
MASTER = "sk-master-node-0123456789"

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="Node.js and npm are not installed")

SCRIPT = """
const { OpenAI } = require(process.argv[1]);
const client = new OpenAI({ baseURL: process.argv[2], apiKey: process.argv[3], maxRetries: 0 });
client.embeddings.create({ model: "mock", input: ["one", "two"] })
  .then((r) => console.log(JSON.stringify(r.data.map((d) => d.embedding))))
  .catch((e) => { console.error(String(e)); process.exit(1); });
"""


def node_sdk() -> Path:
    """The installed `openai` package's directory (installed once into CACHE)."""
    package = CACHE / "node_modules" / "openai"
    if not (package / "package.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([NPM, "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), "openai@^5"],
                              capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            message = f"npm could not install the openai SDK: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
    return package


async def test_node_sdk_decodes_base64_embeddings_to_the_floats(make_proxy):
    package = await asyncio.to_thread(node_sdk)
    proxy = await make_proxy({"master_key": MASTER, "models": [{"name": "mock", "deployments": [{"provider": "mock"}]}]})
    node = await asyncio.create_subprocess_exec(NODE, "-e", SCRIPT, str(package), proxy.url + "/v1", MASTER,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(node.communicate(), 60)
    assert node.returncode == 0, err.decode()
    from_node = json.loads(out)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as oai:
        floats = await oai.embeddings.create(model="mock", input=["one", "two"], encoding_format="float")
    assert [len(v) for v in from_node] == [8, 8]
    for mine, theirs in zip(from_node, floats.data):
        assert mine == pytest.approx(theirs.embedding, abs=1e-6)
    assert proxy.records[0].api == "embeddings" and proxy.records[0].status == 200
