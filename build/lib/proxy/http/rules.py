"""An HTTP request head in the policy's words: policy.model.Operation.

protocol "http", action = the method, objects = (host + normalised path,). Attributes carry what
a rule may want to match without parsing HTTP itself. The path is normalised (decoded, dot
segments removed) because rules are written against what the server will resolve, not against
how an agent chose to spell it; the query is redacted because the summary and attributes go to
the recorder and the approver.
"""

from __future__ import annotations

from policy.model import Operation

from .masking import SECRET_HEADERS, redact_query
from .model import RequestHead, normalize_path

_DEFAULT_PORTS = {"http": 80, "https": 443}


def operation_from_request(head: RequestHead, *, scheme: str = "https", default_host: str = "",
                           default_port: int | None = None) -> Operation:
    """Describe one request. default_host/default_port: the original destination, for requests
    without a Host header (HTTP/1.0) or to record which port the agent dialled."""
    method = head.method.upper()
    host = (head.host or default_host.lower()).rstrip(".")
    port = head.port or default_port
    path = normalize_path(head.path) if head.path else ""
    query = redact_query(head.query)
    authority = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    attrs: dict[str, str] = {
        "method": method,
        "scheme": scheme,
        "host": host,
        "path": path,
        "raw_path": head.path,
        "query": query,
        "http_version": head.http_version,
    }
    if port is not None:
        attrs["port"] = str(port)
    for name in {k.lower() for k, _ in head.headers} - SECRET_HEADERS:
        # Every header but the credential-bearing ones, for `header:` rules.
        attrs[f"header.{name}"] = (head.headers.get_joined(name) or "")[:512]
    auth = head.headers.get("authorization")
    if auth:
        # Only the scheme: a rule may want "Bearer" vs "AWS4-HMAC-SHA256", never the secret.
        attrs["auth_scheme"] = auth.strip().split(" ", 1)[0][:32]
    override = head.headers.get("x-http-method-override")
    risks: list[str] = []
    if override and override.strip().upper() != method:
        # A POST that asks the server to act as DELETE is a DELETE for policy purposes.
        risks.append("method-override")
    if head.upgrade:
        risks.append("protocol-upgrade")
    if method == "CONNECT":
        obj = head.target.lower()
    else:
        obj = f"{authority}{path}"
    summary = f"{method} {scheme}://{authority}{path}" + (f"?{query}" if query else "")
    return Operation(protocol="http", action=method, objects=(obj,), risks=tuple(risks),
                     summary=summary[:1000], attributes=attrs)
