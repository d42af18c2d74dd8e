"""identify() names the operation botocore meant, for requests botocore itself built.

botocore is the oracle (tests only): each call is captured at its before-send hook, its event name
says which operation it is, and identify() must say the same from the wire form alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402

from proxy.aws.identify import AwsCall, identify, identify_request, s3_bucket_from_host  # noqa: E402
from proxy.http.model import Headers, RequestHead  # noqa: E402


class _Captured(Exception):
    pass


def capture(service: str, op: str, params: dict, *, region: str = "us-east-1", addressing: str | None = None,
            endpoint_url: str | None = None, token: str | None = None) -> tuple[AwsCall | None, str, object]:
    cfg = Config(retries={"max_attempts": 1}, s3={"addressing_style": addressing} if addressing else {})
    client = boto3.client(service, region_name=region, aws_access_key_id="AKIAPLACEHOLDER00000",
                          aws_secret_access_key="placeholder", aws_session_token=token, config=cfg,
                          endpoint_url=endpoint_url)
    seen: dict[str, object] = {}

    def hook(request, event_name: str, **_: object) -> None:
        seen["req"] = request
        seen["op"] = event_name.rsplit(".", 1)[-1]
        raise _Captured

    client.meta.events.register("before-send", hook)
    with pytest.raises(_Captured):
        getattr(client, op)(**params)
    req = seen["req"]
    parts = urlsplit(req.url)  # type: ignore[attr-defined]
    body = req.body or b""  # type: ignore[attr-defined]
    if hasattr(body, "read"):
        body = body.read()
    if isinstance(body, str):
        body = body.encode()
    call = identify(req.method, parts.netloc, parts.path or "/", parts.query,  # type: ignore[attr-defined]
                    list(req.headers.items()), body[:4096])  # type: ignore[attr-defined]
    return call, str(seen["op"]), req


B = {"Bucket": "my-bucket"}
BK = {"Bucket": "my-bucket", "Key": "dir/my key+é.txt"}
UP = {**BK, "UploadId": "upload-1"}

S3_CASES = [
    ("list_buckets", {}, ()),
    ("create_bucket", B, ("arn:aws:s3:::my-bucket",)),
    ("delete_bucket", B, ("arn:aws:s3:::my-bucket",)),
    ("head_bucket", B, ("arn:aws:s3:::my-bucket",)),
    ("list_objects", B, ("arn:aws:s3:::my-bucket",)),
    ("list_objects_v2", {**B, "Prefix": "a/"}, ("arn:aws:s3:::my-bucket",)),
    ("list_object_versions", B, None),
    ("list_multipart_uploads", B, None),
    ("get_bucket_location", B, None),
    ("get_bucket_acl", B, None),
    ("put_bucket_acl", {**B, "ACL": "public-read"}, None),
    ("get_bucket_policy", B, None),
    ("put_bucket_policy", {**B, "Policy": "{}"}, None),
    ("delete_bucket_policy", B, None),
    ("get_bucket_versioning", B, None),
    ("put_bucket_versioning", {**B, "VersioningConfiguration": {"Status": "Enabled"}}, None),
    ("get_bucket_tagging", B, None),
    ("put_bucket_tagging", {**B, "Tagging": {"TagSet": [{"Key": "k", "Value": "v"}]}}, None),
    ("delete_bucket_tagging", B, None),
    ("get_bucket_cors", B, None),
    ("delete_bucket_cors", B, None),
    ("get_bucket_encryption", B, None),
    ("delete_bucket_encryption", B, None),
    ("get_public_access_block", B, None),
    ("put_public_access_block", {**B, "PublicAccessBlockConfiguration": {"BlockPublicAcls": True}}, None),
    ("delete_public_access_block", B, None),
    ("get_bucket_lifecycle_configuration", B, None),
    ("delete_bucket_lifecycle", B, None),
    ("get_bucket_website", B, None),
    ("delete_bucket_website", B, None),
    ("get_bucket_notification_configuration", B, None),
    ("get_bucket_ownership_controls", B, None),
    ("get_object_lock_configuration", B, None),
    ("list_bucket_metrics_configurations", B, None),
    ("get_bucket_metrics_configuration", {**B, "Id": "m1"}, None),
    ("put_object", {**BK, "Body": b"data"}, ("arn:aws:s3:::my-bucket/dir/my key+é.txt",)),
    ("get_object", BK, ("arn:aws:s3:::my-bucket/dir/my key+é.txt",)),
    ("head_object", BK, None),
    ("delete_object", BK, ("arn:aws:s3:::my-bucket/dir/my key+é.txt",)),
    ("delete_objects", {**B, "Delete": {"Objects": [{"Key": "a&b"}, {"Key": "c/d"}]}},
     ("arn:aws:s3:::my-bucket/a&b", "arn:aws:s3:::my-bucket/c/d")),
    ("copy_object", {**BK, "CopySource": {"Bucket": "src-bkt", "Key": "from/x y"}},
     ("arn:aws:s3:::my-bucket/dir/my key+é.txt", "arn:aws:s3:::src-bkt/from/x y")),
    ("create_multipart_upload", BK, None),
    ("upload_part", {**UP, "PartNumber": 1, "Body": b"x"}, None),
    ("upload_part_copy", {**UP, "PartNumber": 2, "CopySource": "src-bkt/k"}, None),
    ("complete_multipart_upload", {**UP, "MultipartUpload": {"Parts": [{"ETag": "e", "PartNumber": 1}]}}, None),
    ("abort_multipart_upload", UP, None),
    ("list_parts", UP, None),
    ("get_object_acl", BK, None),
    ("put_object_acl", {**BK, "ACL": "private"}, None),
    ("get_object_tagging", BK, None),
    ("put_object_tagging", {**BK, "Tagging": {"TagSet": []}}, None),
    ("delete_object_tagging", BK, None),
    ("get_object_retention", BK, None),
    ("get_object_legal_hold", BK, None),
    ("restore_object", {**BK, "RestoreRequest": {"Days": 1}}, None),
    ("get_object_attributes", {**BK, "ObjectAttributes": ["ETag"]}, None),
]


@pytest.mark.parametrize("addressing", ["path", "virtual"])
@pytest.mark.parametrize("op,params,objects", S3_CASES, ids=[c[0] for c in S3_CASES])
def test_s3_operations(op: str, params: dict, objects: tuple | None, addressing: str) -> None:
    call, want, _ = capture("s3", op, params, region="eu-west-1", addressing=addressing)
    assert call is not None
    assert call.action == want
    assert call.service == "s3" and call.region == "eu-west-1" and call.family == "s3"
    if objects is not None:
        assert call.resources == objects
    if "Bucket" in params:
        assert call.bucket == "my-bucket"
    if "Key" in params:
        assert call.key == params["Key"]
    if op not in ("list_buckets", "get_bucket_location"):  # botocore sends these path-style always
        assert call.extra["addressing"] == addressing
    opn = call.operation()
    assert opn.protocol == "aws" and opn.action == f"s3:{want}"


def test_s3_custom_endpoint_path_style() -> None:
    call, want, _ = capture("s3", "delete_bucket", B, endpoint_url="http://127.0.0.1:9000")
    assert call is not None and call.action == want == "DeleteBucket"
    assert call.resources == ("arn:aws:s3:::my-bucket",)
    assert "delete" in call.risks


def test_s3_iam_actions_and_risks() -> None:
    call, _, _ = capture("s3", "list_objects_v2", B)
    assert call.iam_action == "s3:ListBucket"
    call, _, _ = capture("s3", "put_bucket_acl", {**B, "ACL": "public-read"})
    assert {"permission-change", "public-access"} <= set(call.risks)
    call, _, _ = capture("s3", "delete_objects", {**B, "Delete": {"Objects": [{"Key": "a"}]}})
    assert call.iam_action == "s3:DeleteObject" and "delete" in call.risks


def test_s3_x_id_hint_is_not_trusted() -> None:
    call = identify("DELETE", "my-bucket.s3.amazonaws.com", "/k", "x-id=GetObject", {}, b"")
    assert call is not None and call.action == "DeleteObject"


def test_s3_delete_objects_truncated_body() -> None:
    body = b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>a</Key></Object><Object><Key>b'
    call = identify("POST", "s3.amazonaws.com", "/bkt", "delete", {}, body)
    assert call.action == "DeleteObjects"
    assert call.resources == ("arn:aws:s3:::bkt/a",)
    assert "objects-truncated" in call.risks


def test_s3_bucket_from_host() -> None:
    assert s3_bucket_from_host("my.dotted.bucket.s3.us-west-2.amazonaws.com") == "my.dotted.bucket"
    assert s3_bucket_from_host("b.s3-us-west-2.amazonaws.com:443") == "b"
    assert s3_bucket_from_host("b.s3.dualstack.eu-west-1.amazonaws.com") == "b"
    assert s3_bucket_from_host("s3.amazonaws.com") is None
    assert s3_bucket_from_host("localhost:9000") is None
    assert s3_bucket_from_host("b.minio.internal:9000", ["minio.internal"]) == "b"


# --- Non-S3 protocol families ------------------------------------------------------------------

OTHER_CASES = [
    # service, op, params, family, resources
    ("dynamodb", "get_item", {"TableName": "users", "Key": {"id": {"S": "1"}}}, "json",
     ("arn:aws:dynamodb:us-east-1:*:table/users",)),
    ("dynamodb", "delete_table", {"TableName": "users"}, "json", ("arn:aws:dynamodb:us-east-1:*:table/users",)),
    ("dynamodb", "batch_write_item", {"RequestItems": {"t1": [{"DeleteRequest": {"Key": {"id": {"S": "1"}}}}],
                                                       "t2": [{"DeleteRequest": {"Key": {"id": {"S": "2"}}}}]}},
     "json", ("arn:aws:dynamodb:us-east-1:*:table/t1", "arn:aws:dynamodb:us-east-1:*:table/t2")),
    ("dynamodb", "list_tables", {}, "json", ()),
    ("ec2", "describe_instances", {}, "ec2", ()),
    ("ec2", "terminate_instances", {"InstanceIds": ["i-1", "i-2"]}, "ec2",
     ("arn:aws:ec2:us-east-1:*:instance/i-1", "arn:aws:ec2:us-east-1:*:instance/i-2")),
    ("iam", "create_user", {"UserName": "mallory"}, "query", ("arn:aws:iam::*:user/mallory",)),
    ("iam", "attach_user_policy", {"UserName": "bob", "PolicyArn": "arn:aws:iam::aws:policy/AdministratorAccess"},
     "query", ("arn:aws:iam::*:user/bob", "arn:aws:iam::aws:policy/AdministratorAccess")),
    ("iam", "create_access_key", {"UserName": "bob"}, "query", ("arn:aws:iam::*:user/bob",)),
    ("sts", "get_caller_identity", {}, "query", ()),
    ("sts", "assume_role", {"RoleArn": "arn:aws:iam::1:role/admin", "RoleSessionName": "ss"}, "query",
     ("arn:aws:iam::1:role/admin",)),
    ("sns", "publish", {"TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": "hi"}, "query",
     ("arn:aws:sns:us-east-1:1:t",)),
    ("sqs", "send_message", {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q", "MessageBody": "x"}, "json",
     ("sqs:QueueUrl/https://sqs.us-east-1.amazonaws.com/1/q",)),
    ("secretsmanager", "get_secret_value", {"SecretId": "prod/db"}, "json", ("secretsmanager:SecretId/prod/db",)),
    ("kms", "decrypt", {"CiphertextBlob": b"x", "KeyId": "alias/k"}, "json", ("kms:KeyId/alias/k",)),
    ("logs", "delete_log_group", {"logGroupName": "g"}, "json", ()),
    ("lambda", "invoke", {"FunctionName": "fn", "Payload": b"{}"}, "rest-json",
     ("arn:aws:lambda:us-east-1:*:function:fn",)),
    ("lambda", "delete_function", {"FunctionName": "fn"}, "rest-json", ("arn:aws:lambda:us-east-1:*:function:fn",)),
    ("lambda", "list_functions", {}, "rest-json", ()),
    ("cloudwatch", "put_metric_data", {"Namespace": "n", "MetricData": [{"MetricName": "m", "Value": 1.0}]},
     "json", ()),
]


@pytest.mark.parametrize("service,op,params,family,resources", OTHER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in OTHER_CASES])
def test_other_services(service: str, op: str, params: dict, family: str, resources: tuple) -> None:
    call, want, _ = capture(service, op, params)
    assert call is not None
    assert call.action == want
    assert call.family == family
    assert call.resources == resources
    assert call.region == "us-east-1"
    assert call.access_key == "AKIAPLACEHOLDER00000"


def test_operation_for_policy() -> None:
    call, _, _ = capture("iam", "attach_user_policy",
                         {"UserName": "bob", "PolicyArn": "arn:aws:iam::aws:policy/AdministratorAccess"})
    op = call.operation()
    assert op.action == "iam:AttachUserPolicy"
    assert "permission-change" in op.risks
    assert op.attributes["service"] == "iam" and op.attributes["api"] == "AttachUserPolicy"
    assert "AdministratorAccess" in op.summary
    call, _, _ = capture("cloudwatch", "put_metric_data", {"Namespace": "n", "MetricData": []})
    assert call.operation().action == "cloudwatch:PutMetricData"  # signing name monitoring, IAM prefix cloudwatch
    call, _, _ = capture("ec2", "terminate_instances", {"InstanceIds": ["i-1"]})
    assert "delete" in call.operation().risks


def test_smithy_rpcv2_cbor_path() -> None:
    call = identify("POST", "monitoring.us-east-1.amazonaws.com",
                    "/service/GraniteServiceVersion20100801/operation/DeleteAlarms", "",
                    {"Smithy-Protocol": "rpc-v2-cbor", "Content-Type": "application/cbor"}, b"\xa0")
    assert (call.action, call.family, call.service) == ("DeleteAlarms", "rpcv2-cbor", "monitoring")
    assert call.operation().action == "cloudwatch:DeleteAlarms"


def test_json_version_and_query_compatibility() -> None:
    call, _, _ = capture("secretsmanager", "list_secrets", {})
    assert call.json_version == "1.1"
    call, _, _ = capture("sqs", "list_queues", {})
    assert call.json_version == "1.0" and call.query_compatible


def test_presigned_url_identified() -> None:
    client = boto3.client("s3", region_name="us-west-2", aws_access_key_id="AKIAPH", aws_secret_access_key="x",
                          config=Config(signature_version="s3v4"))
    url = client.generate_presigned_url("delete_object", Params={"Bucket": "b1", "Key": "k1"})
    p = urlsplit(url)
    call = identify("DELETE", p.netloc, p.path, p.query, {})
    assert call.action == "DeleteObject" and call.presigned and call.access_key == "AKIAPH"
    assert call.region == "us-west-2"
    assert "presigned" in call.risks


def test_session_token_request() -> None:
    call, want, _ = capture("s3", "get_object", BK, token="tok")
    assert call.action == want


def test_not_aws_and_unsigned() -> None:
    assert identify("GET", "example.com", "/", "", {}) is None
    call = identify("GET", "ec2.eu-central-1.amazonaws.com", "/", "Action=DescribeRegions&Version=2016-11-15", {})
    assert (call.service, call.region, call.action, call.family) == ("ec2", "eu-central-1", "DescribeRegions", "ec2")
    call = identify("POST", "iam.amazonaws.com", "/", "", {"Content-Type": "application/x-www-form-urlencoded"},
                    b"Action=DeleteUser&UserName=x&Version=2010-05-08")
    assert (call.region, call.action) == ("us-east-1", "DeleteUser")


def test_unknown_is_flagged() -> None:
    call = identify("PATCH", "apigateway.us-east-1.amazonaws.com", "/restapis/abc", "", {})
    assert call.action == "Unknown"
    assert "unidentified-action" in call.operation().risks
    garbage = identify("POST", "s3.amazonaws.com", "/", "", {"Authorization": "AWS4-HMAC-SHA256 nonsense"}, b"\xff")
    assert garbage is not None and garbage.service == "s3"


def test_identify_request_wrapper() -> None:
    head = RequestHead("DELETE", "/my-bucket", Headers([("Host", "s3.us-east-2.amazonaws.com")]))
    call = identify_request(head)
    assert call.action == "DeleteBucket" and call.region == "us-east-2"


def _signed(scope_service: str, region: str = "us-east-1") -> dict[str, str]:
    return {"Authorization": f"AWS4-HMAC-SHA256 Credential=AKIAPH/20240101/{region}/{scope_service}/aws4_request, "
                             "SignedHeaders=host;x-amz-date, Signature=00",
            "X-Amz-Date": "20240101T000000Z"}


def test_s3_ignores_x_amz_target() -> None:
    """S3 acts on method and path: a JSON-style target header must not relabel a DELETE."""
    hdrs = {**_signed("s3"), "X-Amz-Target": "DynamoDB_20120810.GetItem"}
    call = identify("DELETE", "prod-bucket.s3.amazonaws.com", "/", "", hdrs)
    assert call.action == "DeleteBucket" and call.family == "s3"


def test_scope_host_mismatch_is_flagged() -> None:
    call = identify("POST", "s3.amazonaws.com", "/", "Action=GetCallerIdentity", _signed("sts"))
    assert "service-mismatch" in call.risks and call.extra["host_service"] == "s3"
    call = identify("POST", "iam.amazonaws.com", "/", "Action=ListUsers", _signed("sts"))
    assert "service-mismatch" in call.risks
    ok = identify("POST", "abc.execute-api.us-east-1.amazonaws.com", "/prod/x", "", _signed("execute-api"))
    assert "service-mismatch" not in ok.risks


def test_target_and_action_together_is_ambiguous() -> None:
    hdrs = {**_signed("dynamodb"), "X-Amz-Target": "DynamoDB_20120810.GetItem"}
    call = identify("POST", "dynamodb.us-east-1.amazonaws.com", "/", "Action=DeleteTable", hdrs, b"{}")
    assert call.action == "GetItem" and "ambiguous-action" in call.risks


def test_s3_control_is_not_read_as_object_operations() -> None:
    call = identify("PUT", "123456789012.s3-control.us-east-1.amazonaws.com",
                    "/v20180820/configuration/publicAccessBlock", "", _signed("s3"))
    assert call.action == "Unknown" and call.family == "rest-xml"
    assert "unidentified-action" in call.risks and "service-mismatch" not in call.risks
