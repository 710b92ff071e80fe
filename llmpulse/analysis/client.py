"""Run a read-only query wherever the data is: through the store's owner, or directly.

Either way `readonly.run_readonly` checks and limits it where the store is open (in the
owner for the embedded store), so no path skips the guard; a refusal from the owner keeps
its kind and HTTP status (QueryRefused, 403 or 400).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from llmpulse.analysis.readonly import QueryLimits, QueryRefused, QueryResult, run_readonly
from llmpulse.config import Settings
from llmpulse.embedded.store import open_store, store_owner
from llmpulse.errors import LLMPulseError


def query(settings: Settings, sql: str, max_rows: int | None = None) -> QueryResult:
    ch = settings.clickhouse
    limit = min(max_rows or ch.query_max_rows, ch.query_max_rows)
    if ch.embedded:
        owner = store_owner(settings.data_dir)
        if owner is not None:
            url = owner.get("query_url")
            if not url:
                raise LLMPulseError(
                    f"the embedded store is held by process {owner.get('pid')}, which serves no queries"
                )
            return _remote(str(url), sql, limit, ch.query_max_seconds)
    store = open_store(ch, settings.data_dir, {"role": "query"})
    try:
        return run_readonly(store.client, sql, ch.database, limit, ch.query_max_seconds, QueryLimits.of(ch))
    finally:
        store.close()


def _remote(url: str, sql: str, max_rows: int, max_seconds: float) -> QueryResult:
    body = json.dumps({"sql": sql, "max_rows": max_rows, "max_seconds": max_seconds}).encode()
    req = urllib.request.Request(f"{url}/query", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=max_seconds + 30) as resp:
            data: Any = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            msg = str(exc)
        if exc.code in (400, 403) and str(msg).startswith(("refused:", "query stopped:")):
            # the owner's guard refused it: keep the kind, so HTTP callers answer with the same status
            refused = QueryRefused(msg)
            refused.status = exc.code
            raise refused from None
        raise LLMPulseError(msg) from None
    except OSError as exc:
        raise LLMPulseError(f"cannot reach the store's owner at {url}: {exc}") from None
    return QueryResult.model_validate(data)
