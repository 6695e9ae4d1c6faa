"""Check the requests abby sends against the backends' published API documents.

The documents (OpenAPI 3.0/3.1, JSON or YAML) are not part of abby: the tests
read them from the folder named by $ABBY_API_REFS and skip, saying so, when it
is not set. Request bodies are validated with jsonschema against the operation's
request-body schema, ``$ref``s resolved inside the same document.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest


@functools.cache
def document(name: str) -> dict[str, Any]:
    folder = os.environ.get("ABBY_API_REFS")
    if not folder:
        pytest.skip("set ABBY_API_REFS to the folder holding the backends' API documents to check requests "
                    "against them")
    path = Path(folder) / name
    if not path.is_file():
        pytest.skip(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if name.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def body_schema(doc: dict[str, Any], path: str, method: str, media: str) -> dict[str, Any]:
    operation = doc["paths"][path][method.lower()]
    content = operation["requestBody"]["content"]
    assert media in content, f"{method} {path} documents no {media} body (it has: {', '.join(content)})"
    # $refs are "#/components/...": give the schema the document's components to resolve them in.
    return {**content[media]["schema"], "components": doc.get("components", {})}


def _typed(value: Any) -> Any:
    """A multipart field's text as the JSON value it stands for ("2" -> 2, "true" -> True)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def check_body(doc_name: str, path: str, method: str, media: str, body: dict[str, Any]) -> None:
    """Fail the test with every schema violation of ``body`` (multipart fields given as text
    are typed first; files as any string)."""
    from jsonschema import Draft202012Validator

    doc = document(doc_name)
    schema = body_schema(doc, path, method, media)
    if media == "multipart/form-data":
        body = {k: _typed(v) if isinstance(v, str) else v for k, v in body.items()}
    errors = sorted(Draft202012Validator(schema).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} does not match {doc_name}: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or 'body'}: {e.message}" for e in errors[:5])


def documented(doc_name: str, path: str, method: str) -> bool:
    return method.lower() in document(doc_name)["paths"].get(path, {})
