"""Our refusals make each SDK protocol family raise its ordinary access-denied error.

The loop is the proxy's: botocore builds a request, identify() names it, access_denied() answers,
and botocore parses that answer as it would parse AWS's own (nothing leaves the process).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.awsrequest import AWSResponse, HeadersDict  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402
from botocore.parsers import create_parser  # noqa: E402

from proxy.aws.errors import access_denied, aws_error, cbor_text_map  # noqa: E402
from proxy.aws.identify import AwsCall, identify  # noqa: E402


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: object) -> Iterator[bytes]:  # botocore's raw-response protocol
        yield self._body


def refused_by_proxy(service: str, op: str, params: dict, *, region: str = "us-east-1") -> ClientError:
    client = boto3.client(service, region_name=region, aws_access_key_id="AKIAPH", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 1}))
    calls: list[AwsCall] = []

    def hook(request, **_: object) -> AWSResponse:
        parts = urlsplit(request.url)
        body = request.body or b""
        if hasattr(body, "read"):
            body = body.read()
        if isinstance(body, str):
            body = body.encode()
        call = identify(request.method, parts.netloc, parts.path, parts.query, list(request.headers.items()), body)
        assert call is not None
        calls.append(call)
        canned = access_denied(call, "no-prod-writes", "production is read-only", request_id="req-123")
        payload = b"" if request.method == "HEAD" else canned.body
        return AWSResponse(request.url, canned.status, dict(canned.headers), _Raw(payload))

    client.meta.events.register("before-send", hook)
    with pytest.raises(ClientError) as ei:
        getattr(client, op)(**params)
    assert calls
    return ei.value


CASES = [
    # service, op, params, expected error code
    ("s3", "delete_bucket", {"Bucket": "prod-data"}, "AccessDenied"),
    ("s3", "put_object", {"Bucket": "prod-data", "Key": "k", "Body": b"x"}, "AccessDenied"),
    ("s3", "list_buckets", {}, "AccessDenied"),
    ("s3", "head_object", {"Bucket": "prod-data", "Key": "k"}, "403"),  # HEAD: no body, SDK reports the status
    ("iam", "create_user", {"UserName": "u"}, "AccessDenied"),
    ("sts", "get_caller_identity", {}, "AccessDenied"),
    ("sns", "publish", {"TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": "m"}, "AccessDenied"),
    ("ec2", "terminate_instances", {"InstanceIds": ["i-1"]}, "UnauthorizedOperation"),
    ("dynamodb", "delete_table", {"TableName": "t"}, "AccessDeniedException"),
    ("secretsmanager", "get_secret_value", {"SecretId": "s"}, "AccessDeniedException"),
    ("sqs", "send_message", {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q", "MessageBody": "m"},
     "AccessDenied"),
    ("cloudwatch", "put_metric_data", {"Namespace": "n", "MetricData": [{"MetricName": "m", "Value": 1.0}]},
     "AccessDenied"),
    ("lambda", "invoke", {"FunctionName": "fn"}, "AccessDeniedException"),
    ("lambda", "delete_function", {"FunctionName": "fn"}, "AccessDeniedException"),
]


@pytest.mark.parametrize("service,op,params,code", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sdk_raises_its_normal_access_denied(service: str, op: str, params: dict, code: str) -> None:
    err = refused_by_proxy(service, op, params)
    assert err.response["Error"]["Code"] == code
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    if code != "403":
        msg = err.response["Error"]["Message"]
        assert "no-prod-writes" in msg and "production is read-only" in msg
        assert "not authorized to perform" in msg


def test_message_names_action_and_resource() -> None:
    err = refused_by_proxy("s3", "delete_bucket", {"Bucket": "prod-data"})
    msg = err.response["Error"]["Message"]
    assert "s3:DeleteBucket" in msg and "arn:aws:s3:::prod-data" in msg
    assert err.response["ResponseMetadata"]["RequestId"] == "req-123"


def test_xml_escaping_of_rule_and_reason() -> None:
    call = identify("DELETE", "s3.amazonaws.com", "/b", "", {})
    canned = access_denied(call, "<rule&>", "a < b")
    assert b"&lt;rule&amp;&gt;" in canned.body and b"a &lt; b" in canned.body
    assert dict(canned.headers)["X-Interlock"].startswith("blocked; rule=")


def test_unidentified_call_gets_query_shape() -> None:
    canned = access_denied(None, "r")
    assert canned.status == 403 and canned.body.startswith(b"<ErrorResponse>")


def test_cbor_error_parses_with_botocore() -> None:
    call = identify("POST", "monitoring.us-east-1.amazonaws.com",
                    "/service/GraniteServiceVersion20100801/operation/DeleteAlarms", "",
                    {"Smithy-Protocol": "rpc-v2-cbor"}, b"")
    canned = access_denied(call, "r", "why")
    assert dict(canned.headers)["Smithy-Protocol"] == "rpc-v2-cbor"
    parser = create_parser("smithy-rpc-v2-cbor")
    headers = {k.lower(): v for k, v in canned.headers}
    parsed = parser.parse({"status_code": 403, "headers": HeadersDict(headers), "body": canned.body}, None)
    assert parsed["Error"]["Code"] == "AccessDenied"  # CloudWatch is query-compatible
    assert "why" in parsed["Error"]["Message"]


def test_cbor_lengths() -> None:
    assert cbor_text_map({}) == b"\xa0"
    assert cbor_text_map({"a": "b"}) == b"\xa1\x61a\x61b"
    long = "x" * 300
    assert cbor_text_map({"k": long})[3:6] == b"\x79\x01\x2c"


def test_generic_aws_error_other_codes() -> None:
    canned = aws_error("json", "ThrottlingException", "slow down", status=400)
    assert canned.status == 400 and b'"__type": "ThrottlingException"' in canned.body
