"""The OpenAPI 3.1 description of the service's HTTP API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from imgaccel.service.prewarm_api import OPENAPI_PATHS, OPENAPI_SCHEMAS

_JOB: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "skipped"]},
        "registry": {"type": "string"},
        "repository": {"type": "string"},
        "digest": {"type": "string", "description": "source manifest digest"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mode": {"type": "string", "enum": ["index", "full"]},
        "options": {"type": "object", "description": "the rule that matched"},
        "attempts": {"type": "integer"},
        "next_attempt_at": {"type": "number"},
        "last_error": {"type": ["string", "null"]},
        "skip_reason": {"type": ["string", "null"]},
        "target": {"type": ["string", "null"], "description": "produced reference, with digest"},
        "target_digest": {"type": ["string", "null"]},
        "layers": {"type": "integer"},
        "bytes_in": {"type": "integer"},
        "bytes_out": {"type": "integer"},
        "size_before": {"type": "integer", "description": "bytes of the source layers"},
        "size_after": {"type": "integer", "description": "bytes of the index blobs or converted layers"},
        "progress": {"type": "object"},
        "created_at": {"type": "number"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "deliveries": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["id", "state", "registry", "repository", "digest", "mode"],
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}}
_JSON_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JOB_RESPONSE = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "imgaccel conversion and prewarm service", "version": "1"},
    "components": {
        "schemas": {"Job": _JOB, "Error": _ERROR, **OPENAPI_SCHEMAS},
        "securitySchemes": {"token": {"type": "apiKey", "in": "header", "name": "Authorization"}},
    },
    "security": [{"token": []}],
    "paths": {
        "/events": {
            "post": {
                "summary": "Registry notification, Harbor webhook or Harbor CloudEvent",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "202": {"description": "jobs created or found (ids in 'jobs')"},
                    "200": {"description": "acknowledged, nothing to convert"},
                    "400": {"description": "malformed", **_JSON_ERROR},
                    "401": {"description": "missing or wrong credential", **_JSON_ERROR},
                    "413": {"description": "body over the limit", **_JSON_ERROR},
                },
            }
        },
        "/api/v1/jobs": {
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string"}},
                    {"name": "repository", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 500}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {"200": {"description": "a page of jobs"}, "401": {"description": "unauthorized"}},
            },
            "post": {
                "summary": "Convert a reference now",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"reference": {"type": "string"}}}
                        }
                    },
                },
                "responses": {
                    "202": {"description": "the job", **_JOB_RESPONSE},
                    "400": _JSON_ERROR | {"description": "bad"},
                },
            },
        },
        "/api/v1/jobs/{id}": {
            "get": {"parameters": [_ID], "responses": {"200": {"description": "the job", **_JOB_RESPONSE}}}
        },
        "/api/v1/jobs/{id}/retry": {
            "post": {"parameters": [_ID], "responses": {"202": {"description": "requeued", **_JOB_RESPONSE}}}
        },
        "/api/v1/jobs/{id}/events": {
            "get": {
                "summary": "Server-sent events: the job record on each change until it finishes",
                "parameters": [_ID],
                "responses": {"200": {"description": "text/event-stream"}},
            }
        },
        "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
        "/readyz": {
            "get": {"security": [], "responses": {"200": {"description": "ready"}, "503": {"description": "not"}}}
        },
        "/metrics": {"get": {"security": [], "responses": {"200": {"description": "Prometheus text format"}}}},
        **OPENAPI_PATHS,
    },
}
