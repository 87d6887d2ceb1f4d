"""The interactive OpenAPI page the README points at: ``GET /docs`` and its schema ``GET /openapi.json``."""

import httpx
from serve_helpers import one_torch_thread, open_audit, running_server  # noqa: F401 (autouse)

from so8t.serve.app import create_app
from so8t.serve.engines.hf import HFEngine


def test_docs_page_and_openapi_schema_describe_think(tmp_path):
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(HFEngine.load(), audit)) as url:
        page = httpx.get(f"{url}/docs", timeout=30)
        schema = httpx.get(f"{url}/openapi.json", timeout=30)
    audit.close()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text and "swagger" in page.text.lower()
    assert schema.status_code == 200
    think = schema.json()["paths"]["/think"]["post"]
    assert "requestBody" in think and {"prompt", "max_new_tokens"} <= set(
        schema.json()["components"]["schemas"][think["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"])
