"""AWS-shaped refusals, so the agent's SDK raises the exception it raises for a real IAM deny.

Why mimic AWS instead of sending the proxy's generic 403 JSON: SDKs parse error bodies by
protocol family, and a body in the wrong shape becomes an unhelpful parse error or a generic
"Forbidden" that agents then retry. In the right shape the agent's code sees AccessDenied (or
EC2's UnauthorizedOperation) with a message naming the Interlock rule, exactly as if IAM had said
no, and its usual error handling applies.

Shapes, after each protocol's published error format:
  s3          <Error><Code>…</Code><Message>…</Message><RequestId>…</RequestId></Error>
  query       <ErrorResponse><Error><Type>Sender</Type><Code>…</Code>…</Error><RequestId>…</ErrorResponse>
  rest-xml    as query (Route 53, CloudFront)
  ec2         <Response><Errors><Error><Code>…</Code>…</Error></Errors><RequestID>…</RequestID></Response>
  json        {"__type": "…", "message": "…"} with Content-Type application/x-amz-json-1.0/1.1
  rest-json   x-amzn-ErrorType header + {"message": …}
  rpcv2-cbor  CBOR map {"__type", "message"} with Smithy-Protocol: rpc-v2-cbor
JSON and CBOR services that used to speak query (SQS, CloudWatch) also get x-amzn-query-error,
from which SDKs take the old code ("AccessDenied").
"""

from __future__ import annotations

import json
import uuid
from xml.sax.saxutils import escape

from proxy.http.responses import MARK_HEADER, Canned

from .identify import AwsCall

# Code per family for an authorization failure, as the services themselves name it.
DENY_CODES = {
    "s3": "AccessDenied", "query": "AccessDenied", "rest-xml": "AccessDenied", "ec2": "UnauthorizedOperation",
    "json": "AccessDeniedException", "rest-json": "AccessDeniedException", "rpcv2-cbor": "AccessDeniedException",
}


def deny_message(call: AwsCall | None, rule: str, reason: str = "") -> str:
    """The text AWS would give, with Interlock's rule in place of the missing IAM permission."""
    if call is None:
        what = "this action"
        res = ""
    else:
        what = call.iam_action if call.service in ("s3",) else f"{call.iam_prefix}:{call.action}"
        res = f" on resource: {call.resources[0]}" if call.resources else ""
    msg = f"User is not authorized to perform: {what}{res} because Interlock policy rule '{rule}' denied it"
    return msg + (f": {reason}" if reason else "")


def access_denied(call: AwsCall | None, rule: str, reason: str = "", *, request_id: str | None = None) -> Canned:
    """The refusal for call (None: unidentified, answered in the generic query shape)."""
    family = call.family if call else "query"
    return aws_error(family, DENY_CODES.get(family, "AccessDenied"), deny_message(call, rule, reason), status=403,
                     call=call, request_id=request_id, rule=rule)


def aws_error(family: str, code: str, message: str, *, status: int = 400, call: AwsCall | None = None,
              request_id: str | None = None, rule: str | None = None) -> Canned:
    """Any AWS error in family's shape (also usable for throttling-style answers)."""
    rid = request_id or str(uuid.uuid4())
    mark = (MARK_HEADER, f"blocked; rule={_token(rule)}" if rule else "error")
    if family == "s3":
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
                f"<RequestId>{escape(rid)}</RequestId><HostId>interlock</HostId></Error>")
        headers = (("Content-Type", "application/xml"), ("x-amz-request-id", rid), ("x-amz-id-2", "interlock"), mark)
        return Canned(status, headers, body.encode())
    if family == "ec2":
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
                f"</Error></Errors><RequestID>{escape(rid)}</RequestID></Response>")
        return Canned(status, (("Content-Type", "text/xml;charset=UTF-8"), mark), body.encode())
    if family in ("json", "rpcv2-cbor"):
        headers_l: list[tuple[str, str]] = [("x-amzn-RequestId", rid), mark]
        if call is not None and call.query_compatible:
            headers_l.append(("x-amzn-query-error", f"{_query_code(code)};Sender"))
        payload = {"__type": code, "message": message}
        if family == "rpcv2-cbor":
            headers_l[:0] = [("Content-Type", "application/cbor"), ("Smithy-Protocol", "rpc-v2-cbor")]
            return Canned(status, tuple(headers_l), cbor_text_map(payload))
        version = (call.json_version if call else None) or "1.0"
        headers_l.insert(0, ("Content-Type", f"application/x-amz-json-{version}"))
        return Canned(status, tuple(headers_l), json.dumps(payload).encode())
    if family == "rest-json":
        headers = (("Content-Type", "application/json"), ("x-amzn-ErrorType", code), ("x-amzn-RequestId", rid), mark)
        return Canned(status, headers, json.dumps({"message": message, "Message": message}).encode())
    # query and rest-xml
    ns = ""
    if call is not None and family == "query" and call.extra.get("api_version"):
        ns = f' xmlns="https://{escape(call.service)}.amazonaws.com/doc/{escape(call.extra["api_version"])}/"'
    body = (f"<ErrorResponse{ns}><Error><Type>Sender</Type><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error><RequestId>{escape(rid)}</RequestId></ErrorResponse>")
    return Canned(status, (("Content-Type", "text/xml"), ("x-amzn-RequestId", rid), mark), body.encode())


def _query_code(code: str) -> str:
    return code.removesuffix("Exception") if code == "AccessDeniedException" else code


def _token(s: str | None) -> str:
    return "".join(c if 0x20 < ord(c) < 0x7F and c not in ',;"' else "_" for c in (s or ""))[:128]


def cbor_text_map(m: dict[str, str]) -> bytes:
    """RFC 8949 encoding of a map of text strings: all an error body needs."""
    def head(major: int, n: int) -> bytes:
        if n < 24:
            return bytes([major << 5 | n])
        for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
            if n < 1 << (8 * size):
                return bytes([major << 5 | ai]) + n.to_bytes(size, "big")
        raise ValueError("too long")

    out = bytearray(head(5, len(m)))
    for k, v in m.items():
        for s in (k, v):
            b = s.encode("utf-8")
            out += head(3, len(b)) + b
    return bytes(out)
