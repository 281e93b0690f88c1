"""Print the HTTP API's OpenAPI document, as served at /v1/openapi.json.

Regenerate the checked-in copy (tests/test_api.py fails when it is stale)::

    .venv/bin/python scripts/openapi.py > docs/openapi.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.api.openapi import build_document, dumps
from services.api.routes import route_table

if __name__ == "__main__":
    sys.stdout.write(dumps(build_document(route_table())))
