"""The JSON API (`bemi_asgi.api`) mounted in FastAPI, through httpx against real changes in a real database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bemi_asgi import QueryError
from bemi_asgi.api import allow_all, history_router
from bemi_asgi.history.filters import decode_cursor

from ._change_writer import ChangesEnv as Env
from ._change_writer import changes_env
from .test_ui import T0, write_story

PREFIX = "/api/history"
SECRET = "the API tests' fixed secret, number 1"


@pytest.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with changes_env(database, pool_size=3) as env:
        await write_story(env.writer)
        yield env


def app_for(env: Env, **options: Any) -> FastAPI:
    app = FastAPI(title="An app with history")
    options.setdefault("authorize", allow_all)
    app.include_router(history_router(env.bemi, **options), prefix=PREFIX)
    return app


def tenant_app(env: Env) -> FastAPI:
    """The API as a multi-tenant app mounts it: x-user signs in (mallory is forbidden), x-tenant scopes."""

    async def authorize(request: Request) -> bool | Response | None:
        user = request.headers.get("x-user")
        if user == "redirect-me":
            return RedirectResponse("/login", status_code=303)
        return None if user is None else user != "mallory"

    def scope(request: Request) -> dict[str, Any]:
        return {"tenant_id": int(request.headers["x-tenant"])}

    return app_for(env, authorize=authorize, scope=scope, secret=SECRET)


def client_for(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


async def test_find_pages_through_every_change_in_commit_order(env: Env) -> None:
    """/changes returns what find() returns, newest first, and keyset pages of 3 cover every change exactly once."""
    expected = [str(change.id) for change in await env.bemi.changes.find()]
    async with client_for(app_for(env)) as client:
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 3}
        while True:
            body = (await client.get(f"{PREFIX}/changes", params=params)).json()
            seen.extend(change["ref"] for change in body["changes"])
            if body["next_cursor"] is None:
                break
            params["cursor"] = body["next_cursor"]
        ascending = (await client.get(f"{PREFIX}/changes", params={"order": "asc", "limit": 100})).json()
    assert seen == expected
    assert [change["ref"] for change in ascending["changes"]] == expected[::-1]


async def test_filters_and_count_match_the_query_helpers(env: Env) -> None:
    """Table, key, operation, context and time filters narrow /changes and /changes/count as find and count do."""
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"table": "items", "key": "1"}, {"table": "items", "primary_key": "1"}),
        ({"operation": ["DELETE", "CREATE"]}, {"operation": ["DELETE", "CREATE"]}),
        ({"context": json.dumps({"user": "alice"})}, {"context": {"user": "alice"}}),
        (
            {"since": (T0 + timedelta(minutes=1)).isoformat(), "until": (T0 + timedelta(minutes=3)).isoformat()},
            {"since": T0 + timedelta(minutes=1), "until": T0 + timedelta(minutes=3)},
        ),
    ]
    async with client_for(app_for(env)) as client:
        for params, filters in cases:
            expected = [str(change.id) for change in await env.bemi.changes.find(**filters)]
            found = (await client.get(f"{PREFIX}/changes", params=params)).json()
            counted = (await client.get(f"{PREFIX}/changes/count", params=params)).json()
            assert 0 < len(expected) < 7, filters
            assert [change["ref"] for change in found["changes"]] == expected, params
            assert counted == {"count": len(expected)}, params


async def test_row_history_as_of_and_blame(env: Env) -> None:
    """A row's history, its state at a moment (none before it existed) and which change set each column."""
    history = await env.bemi.history("items", 1)
    async with client_for(app_for(env)) as client:
        rows = (await client.get(f"{PREFIX}/rows/history", params={"table": "items", "key": "1"})).json()
        then = await client.get(
            f"{PREFIX}/rows/as-of", params={"table": "items", "key": "1", "at": (T0 + timedelta(minutes=2)).isoformat()}
        )
        before = await client.get(
            f"{PREFIX}/rows/as-of", params={"table": "items", "key": "1", "at": (T0 - timedelta(hours=1)).isoformat()}
        )
        blame = (await client.get(f"{PREFIX}/rows/blame", params={"table": "public.items", "key": "1"})).json()
    assert [change["ref"] for change in rows] == [str(change.id) for change in history]
    assert rows[1]["changed_fields"] == ["name"]
    assert rows[1]["schema"] == "public"
    assert then.json()["state"] == {"id": 1, "name": "ink pen", "price": 3}
    assert then.json()["change"]["ref"] == str(history[1].id)
    assert before.json() == {"state": None, "change": None}
    assert {name: change["ref"] for name, change in blame["columns"].items()} == {
        "id": str(history[0].id),
        "name": str(history[1].id),
        "price": str(history[2].id),
    }


async def test_transaction_and_request_views(env: Env) -> None:
    """A transaction's and a request's changes in commit order, linked by the references the changes carry."""
    async with client_for(app_for(env)) as client:
        notes = (await client.get(f"{PREFIX}/changes", params={"table": "notes"})).json()["changes"]
        transaction = (await client.get(f"{PREFIX}/transactions/{notes[0]['transaction']}")).json()
        request = (await client.get(f"{PREFIX}/requests/r3", params={"limit": 1})).json()
        rest = (await client.get(f"{PREFIX}/requests/r3", params={"cursor": request["next_cursor"]})).json()
        unknown = await client.get(f"{PREFIX}/transactions/99999")
    assert [(c["table"], c["operation"]) for c in transaction["changes"]] == [("items", "UPDATE"), ("notes", "CREATE")]
    assert {change["context"]["request_id"] for change in request["changes"] + rest["changes"]} == {"r3"}
    assert [c["committed_at"] for c in request["changes"] + rest["changes"]] == [
        (T0 + timedelta(minutes=2)).isoformat().replace("+00:00", "Z"),
        (T0 + timedelta(minutes=3)).isoformat().replace("+00:00", "Z"),
    ]
    assert rest["next_cursor"] is None
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "No changes of this transaction are visible to you."}


async def test_a_tenant_never_sees_another_tenants_changes_through_any_endpoint(env: Env) -> None:
    """Scoped to tenant 1, every endpoint answers from tenant 1's changes only: tenant 2's rows, transactions and
    requests are not found, and no response carries a stored id, transaction id or cursor position."""
    tenant_two = await env.bemi.changes.find(context={"tenant_id": 2})
    assert tenant_two
    answers: list[httpx.Response] = []
    async with client_for(tenant_app(env), {"x-user": "ann", "x-tenant": "1"}) as client:
        found = await client.get(f"{PREFIX}/changes", params={"limit": 2})
        answers.append(found)
        answers.append(await client.get(f"{PREFIX}/changes", params={"cursor": found.json()["next_cursor"]}))
        answers.append(await client.get(f"{PREFIX}/changes", params={"table": "notes"}))
        other = await client.get(f"{PREFIX}/changes", params={"context": json.dumps({"tenant_id": 2})})
        counted = await client.get(f"{PREFIX}/changes/count")
        answers.append(counted)
        missing_table = await client.get(f"{PREFIX}/changes/count", params={"table": "no_such_table"})
        row_two = await client.get(f"{PREFIX}/rows/history", params={"table": "items", "key": "2"})
        as_of_two = await client.get(
            f"{PREFIX}/rows/as-of", params={"table": "items", "key": "2", "at": (T0 + timedelta(minutes=2)).isoformat()}
        )
        blame_two = await client.get(f"{PREFIX}/rows/blame", params={"table": "items", "key": "2"})
        answers.append(await client.get(f"{PREFIX}/rows/history", params={"table": "items", "key": "1"}))
        answers.append(await client.get(f"{PREFIX}/rows/blame", params={"table": "items", "key": "1"}))
        request_two = await client.get(f"{PREFIX}/requests/r2")
        plain_transaction = await client.get(f"{PREFIX}/transactions/{tenant_two[0].transaction_id}")
    async with client_for(tenant_app(env), {"x-user": "bob", "x-tenant": "2"}) as client:
        token_two = (await client.get(f"{PREFIX}/changes", params={"table": "notes"})).json()["changes"][0]
    async with client_for(tenant_app(env), {"x-user": "ann", "x-tenant": "1"}) as client:
        transaction_two = await client.get(f"{PREFIX}/transactions/{token_two['transaction']}")
        answers.append(await client.get(f"{PREFIX}/requests/r3"))

    seen = [change for answer in answers for change in _changes(answer.json())]
    assert len({change["ref"] for change in seen}) == 3  # tenant 1's three changes, and only those
    assert {change["context"]["tenant_id"] for change in seen} == {1}
    assert counted.json() == {"count": 3}
    assert other.json() == {"changes": [], "next_cursor": None}
    assert answers[2].json() == {"changes": [], "next_cursor": None}
    assert missing_table.json() == {"count": 0}  # like a table with nothing in scope: nothing learnt of the catalog
    assert row_two.status_code == 404
    assert as_of_two.json() == {"state": None, "change": None}
    assert blame_two.json() == {"columns": {}}
    assert request_two.status_code == 404
    assert plain_transaction.status_code == 404  # a stored transaction id is not a reference under a scope
    assert transaction_two.status_code == 404
    assert transaction_two.json() == plain_transaction.json()
    stored_numbers = {str(number) for change in await env.bemi.changes.find() for number in _numbers(change)}
    for answer in answers:
        for change in _changes(answer.json()):
            assert change["ref"] not in stored_numbers
            assert change["transaction"] not in stored_numbers
        cursor = answer.json().get("next_cursor") if isinstance(answer.json(), dict) else None
        if cursor:  # sealed, not find()'s cursor, which spells out the commit LSN
            with pytest.raises(QueryError):
                decode_cursor(cursor)


def _changes(body: Any) -> list[dict[str, Any]]:
    """The changes in any endpoint's answer."""
    if isinstance(body, list):
        return body
    if "changes" in body:
        return list(body["changes"])
    if "columns" in body:
        return list(body["columns"].values())
    return []


def _numbers(change: Any) -> tuple[int, ...]:
    return (change.id, change.transaction_id, change.commit_lsn, change.position)


async def test_refusals_and_bad_input_are_json_errors(env: Env) -> None:
    """No user: 401; a forbidden user: 403; authorize's own redirect passes through; malformed input: 400;
    each with a JSON body saying why."""
    app = tenant_app(env)
    async with client_for(app) as client:
        anonymous = await client.get(f"{PREFIX}/changes", headers={"x-tenant": "1"})
        forbidden = await client.get(f"{PREFIX}/changes", headers={"x-user": "mallory", "x-tenant": "1"})
        redirected = await client.get(f"{PREFIX}/changes", headers={"x-user": "redirect-me", "x-tenant": "1"})
        headers = {"x-user": "ann", "x-tenant": "1"}
        bad_context = await client.get(f"{PREFIX}/changes", params={"context": "[1]"}, headers=headers)
        naive = await client.get(f"{PREFIX}/changes", params={"since": "2025-03-01T12:00:00"}, headers=headers)
        bad_cursor = await client.get(f"{PREFIX}/changes", params={"cursor": "forged"}, headers=headers)
        future = await client.get(
            f"{PREFIX}/rows/as-of", params={"table": "items", "key": "1", "at": "2999-01-01T00:00:00Z"}, headers=headers
        )
        bad_operation = await client.get(f"{PREFIX}/changes", params={"operation": "MERGE"}, headers=headers)
    assert (anonymous.status_code, anonymous.json()) == (401, {"detail": "Sign in to see the change history."})
    assert (forbidden.status_code, forbidden.json()) == (403, {"detail": "You may not see the change history."})
    assert redirected.status_code == 303
    assert redirected.headers["location"] == "/login"
    assert redirected.json() == {"detail": "Refused by authorize."}
    for answer, words in [
        (bad_context, "JSON object"),
        (naive, "naive datetime"),
        (bad_cursor, "cursor"),
        (future, "in the future"),
    ]:
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["detail"]
    assert bad_operation.status_code == 422  # FastAPI's own validation, JSON as well
    assert bad_operation.headers["content-type"] == "application/json"


async def test_openapi_schema_shows_the_endpoints_and_response_models(env: Env) -> None:
    """The app's OpenAPI schema lists every endpoint with its response model and JSON errors, and the models'
    fields, so a client can be generated from it."""
    async with client_for(app_for(env)) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {
        f"{PREFIX}/changes",
        f"{PREFIX}/changes/count",
        f"{PREFIX}/rows/history",
        f"{PREFIX}/rows/as-of",
        f"{PREFIX}/rows/blame",
        f"{PREFIX}/transactions/{{ref}}",
        f"{PREFIX}/requests/{{request_id}}",
    }
    find = paths[f"{PREFIX}/changes"]["get"]
    assert find["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChangePageView"
    }
    assert find["responses"]["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorView"
    }
    assert {p["name"] for p in find["parameters"]} == {
        "table",
        "schema",
        "key",
        "operation",
        "context",
        "since",
        "until",
        "order",
        "limit",
        "cursor",
    }
    components = schema["components"]["schemas"]
    change = components["ChangeView"]
    assert set(change["properties"]) == {
        "ref",
        "transaction",
        "primary_key",
        "before",
        "after",
        "context",
        "database",
        "schema",
        "table",
        "operation",
        "committed_at",
        "changed_fields",
    }
    assert components["Operation"]["enum"] == ["CREATE", "UPDATE", "DELETE", "TRUNCATE", "DDL", "SNAPSHOT"]
    assert paths[f"{PREFIX}/rows/blame"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BlameView"
    }


def test_router_refuses_a_missing_authorize_and_a_secret_without_scope(env: Env) -> None:
    """Like the change browser, the API is closed unless authorize= says who may read, and secret= needs scope=."""
    with pytest.raises(TypeError, match="needs authorize=fn"):
        history_router(env.bemi)
    with pytest.raises(ValueError, match="scope="):
        history_router(env.bemi, authorize=allow_all, secret=SECRET)
