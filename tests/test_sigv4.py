"""Our SigV4 signer agrees with botocore's (the oracle, used in tests only) and with moto's server."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

botocore = pytest.importorskip("botocore")
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth, SigV4QueryAuth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials as BotoCredentials  # noqa: E402

from proxy.aws import sigv4  # noqa: E402
from proxy.aws.sigv4 import Credentials, SigV4Error, parse_authorization, resign, sign, verify  # noqa: E402
from proxy.http.model import Headers, RequestHead  # noqa: E402

PLACEHOLDER = Credentials("AKIAPLACEHOLDER00000", "placeholder-secret-not-real")
REAL = Credentials("AKIAREALKEY000000001", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
REAL_TOKEN = Credentials("ASIAREALTEMP00000001", "tmp/secret+key", token="FwoGZXIvYXdzEJr//////////session+token=")
FIXED = dt.datetime(2024, 3, 9, 12, 34, 56, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def frozen_botocore_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda remove_tzinfo=True: FIXED.replace(tzinfo=None))


def boto_creds(c: Credentials) -> BotoCredentials:
    return BotoCredentials(c.access_key, c.secret_key, c.token)


def head_of(req: AWSRequest) -> tuple[RequestHead, bytes]:
    """The request as it will be on the wire, in our model."""
    parts = urlsplit(req.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = parts.netloc
    if (parts.scheme, parts.port) in (("https", 443), ("http", 80)):
        netloc = parts.hostname or netloc
    headers = Headers([("Host", netloc)] + [(k, v) for k, v in req.headers.items()])
    body = req.body or b""
    if isinstance(body, str):
        body = body.encode()
    return RequestHead(req.method, target, headers), body


def boto_sign(auth_cls: type, creds: Credentials, service: str, region: str, method: str, url: str,
              headers: dict[str, str] | None = None, data: bytes = b"", **kw: object) -> AWSRequest:
    req = AWSRequest(method=method, url=url, headers=headers or {}, data=data)
    if auth_cls in (SigV4QueryAuth, S3SigV4QueryAuth):
        auth_cls(boto_creds(creds), service, region, **kw).add_auth(req)
    else:
        auth_cls(boto_creds(creds), service, region).add_auth(req)
    return req


# (auth class, service, region, method, url, headers, body)
CASES = [
    ("iam-query", SigV4Auth, "iam", "us-east-1", "GET",
     "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08", {}, b""),
    ("dynamodb-json", SigV4Auth, "dynamodb", "eu-west-1", "POST", "https://dynamodb.eu-west-1.amazonaws.com/",
     {"X-Amz-Target": "DynamoDB_20120810.GetItem", "Content-Type": "application/x-amz-json-1.0"},
     b'{"TableName":"t","Key":{"id":{"S":"1"}}}'),
    ("sqs-form", SigV4Auth, "sqs", "us-west-2", "POST", "https://sqs.us-west-2.amazonaws.com/",
     {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
     b"Action=SendMessage&MessageBody=hello%20world&QueueUrl=https%3A%2F%2Fq"),
    ("apigw-odd-path", SigV4Auth, "execute-api", "us-east-1", "GET",
     "https://abc.execute-api.us-east-1.amazonaws.com/prod/a/./b//c%20d/../e%2Ff?z=1&a=%2B+x&a=0&empty=&k",
     {"X-Custom": "  spaced    value  ", "User-Agent": "agent/1.0"}, b""),
    ("unicode-query", SigV4Auth, "lambda", "us-east-1", "GET",
     "https://lambda.us-east-1.amazonaws.com/2015-03-31/functions?Marker=%C3%A9t%C3%A9%2F%3D~&MaxItems=5",
     {}, b""),
    ("s3-put-encoded-key", S3SigV4Auth, "s3", "us-east-1", "PUT",
     "http://bucket.s3.amazonaws.com/dir/a%20b%2Bc~%C3%A9/..%2Fx.txt",
     {"Content-Type": "text/plain", "x-amz-meta-owner": "me", "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="},
     b"hello world"),
    ("s3-unsigned-payload", S3SigV4Auth, "s3", "eu-central-1", "GET",
     "https://s3.eu-central-1.amazonaws.com/bkt/key?list-type=2&prefix=a%2Fb&delimiter=%2F",
     {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}, b""),
    ("s3-trailer", S3SigV4Auth, "s3", "us-east-1", "PUT", "https://bkt.s3.amazonaws.com/obj",
     {"X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "Content-Encoding": "aws-chunked",
      "X-Amz-Trailer": "x-amz-checksum-crc32", "X-Amz-Decoded-Content-Length": "5"},
     b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"),
    ("s3-acl-subresource", S3SigV4Auth, "s3", "us-east-1", "PUT", "http://127.0.0.1:5000/bkt?acl",
     {"x-amz-acl": "private"}, b""),
]


@pytest.mark.parametrize("creds", [REAL, REAL_TOKEN], ids=["plain", "session-token"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fresh_signature_matches_botocore(case: tuple, creds: Credentials) -> None:
    _, auth_cls, service, region, method, url, headers, body = case
    req = boto_sign(auth_cls, creds, service, region, method, url, dict(headers), body)
    want = parse_authorization(req.headers["Authorization"])
    unsigned, body = head_of(AWSRequest(method=method, url=url, headers=dict(headers), data=body))
    if "X-Amz-Content-SHA256" in req.headers:
        unsigned.headers.set("X-Amz-Content-SHA256", req.headers["X-Amz-Content-SHA256"])
    # botocore signs the query as sent; with strictly encoded input that equals the spec's form.
    style = "raw" if "+" in url.partition("?")[2] else "strict"
    ours = sign(unsigned, creds, region, service, body=body, now=FIXED, signed_headers=want.signed_headers,
                query_style=style)
    assert ours.headers.get("authorization") == req.headers["Authorization"]
    if creds.token:
        assert ours.headers.get("x-amz-security-token") == creds.token


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_default_signed_headers_match_botocore(case: tuple) -> None:
    _, auth_cls, service, region, method, url, headers, body = case
    req = boto_sign(auth_cls, REAL, service, region, method, url, dict(headers), body)
    unsigned, body = head_of(AWSRequest(method=method, url=url, headers=dict(headers), data=body))
    if "X-Amz-Content-SHA256" in req.headers:
        unsigned.headers.set("X-Amz-Content-SHA256", req.headers["X-Amz-Content-SHA256"])
    style = "raw" if "+" in url.partition("?")[2] else "strict"
    ours = sign(unsigned, REAL, region, service, body=body, now=FIXED, query_style=style)
    assert ours.headers.get("authorization") == req.headers["Authorization"]


@pytest.mark.parametrize("creds", [REAL, REAL_TOKEN], ids=["plain", "session-token"])
@pytest.mark.parametrize("agent_token", [None, "placeholder-token"], ids=["agent-no-token", "agent-token"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_resign_equals_botocore_signing_with_real_keys(case: tuple, creds: Credentials, agent_token: str | None) -> None:
    _, auth_cls, service, region, method, url, headers, body = case
    agent = Credentials(PLACEHOLDER.access_key, PLACEHOLDER.secret_key, agent_token)
    from_agent = boto_sign(auth_cls, agent, service, region, method, url, dict(headers), body)
    head, wire_body = head_of(from_agent)
    assert verify(head, agent, body=wire_body), "our canonicalisation must reproduce the SDK's"
    out = resign(head, creds, body=wire_body, now=FIXED, placeholder=agent)
    expected = boto_sign(auth_cls, creds, service, region, method, url, dict(headers), body)
    got = parse_authorization(out.headers.get("authorization"))
    want = parse_authorization(expected.headers["Authorization"])
    assert got.access_key == creds.access_key
    assert got.scope == want.scope
    assert verify(out, creds, body=wire_body)
    assert not verify(out, agent, body=wire_body)
    if set(got.signed_headers) == set(want.signed_headers):
        assert got.signature == want.signature
    assert out.headers.get("x-amz-security-token") == creds.token
    assert out.target == head.target
    # Everything else the SDK sent is untouched.
    keep = {"authorization", "x-amz-security-token", "x-amz-date"}
    assert [(k, v) for k, v in out.headers if k.lower() not in keep] == \
        [(k, v) for k, v in head.headers if k.lower() not in keep]


def test_resign_refreshes_date_by_default() -> None:
    req = boto_sign(SigV4Auth, PLACEHOLDER, "sts", "us-east-1", "POST", "https://sts.amazonaws.com/",
                    {"Content-Type": "application/x-www-form-urlencoded"}, b"Action=GetCallerIdentity&Version=2011-06-15")
    head, body = head_of(req)
    later = FIXED + dt.timedelta(days=1, minutes=20)
    out = resign(head, REAL, body=body, now=later)
    assert out.headers.get("x-amz-date") == "20240310T125456Z"
    assert parse_authorization(out.headers.get("authorization")).scope.date == "20240310"
    assert verify(out, REAL, body=body)
    kept = resign(head, REAL, body=body, refresh_date=False)
    assert kept.headers.get("x-amz-date") == "20240309T123456Z" and verify(kept, REAL, body=body)


def test_resign_refuses_foreign_key_unsigned_and_chunk_signed() -> None:
    req = boto_sign(SigV4Auth, REAL, "sts", "us-east-1", "GET", "https://sts.amazonaws.com/?Action=GetCallerIdentity")
    head, body = head_of(req)
    with pytest.raises(SigV4Error, match="unexpected access key"):
        resign(head, REAL, body=body, expected_access_key=PLACEHOLDER.access_key)
    with pytest.raises(SigV4Error, match="not SigV4"):
        resign(RequestHead("GET", "/", Headers([("Host", "x")])), REAL)
    chunked = head_of(boto_sign(S3SigV4Auth, PLACEHOLDER, "s3", "us-east-1", "PUT", "https://b.s3.amazonaws.com/k"))[0]
    chunked.headers.set("X-Amz-Content-SHA256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    with pytest.raises(SigV4Error, match="chunk-signed"):
        resign(chunked, REAL)
    sigv2 = RequestHead("GET", "/", Headers([("Host", "x"), ("Authorization", "AWS AKIA:abc=")]))
    with pytest.raises(SigV4Error, match="unsupported"):
        resign(sigv2, REAL)


def test_resign_non_s3_needs_body() -> None:
    req = boto_sign(SigV4Auth, PLACEHOLDER, "dynamodb", "us-east-1", "POST", "https://dynamodb.us-east-1.amazonaws.com/",
                    {"X-Amz-Target": "DynamoDB_20120810.ListTables"}, b"{}")
    head, _ = head_of(req)
    with pytest.raises(SigV4Error, match="pass the body"):
        resign(head, REAL)


def test_tampered_request_fails_verification() -> None:
    req = boto_sign(SigV4Auth, PLACEHOLDER, "dynamodb", "us-east-1", "POST", "https://dynamodb.us-east-1.amazonaws.com/",
                    {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, b'{"TableName":"a"}')
    head, body = head_of(req)
    assert verify(head, PLACEHOLDER, body=body)
    assert not verify(head, PLACEHOLDER, body=b'{"TableName":"b"}')
    bad = head.copy()
    bad.headers.set("X-Amz-Target", "DynamoDB_20120810.DeleteTable")
    assert not verify(bad, PLACEHOLDER, body=body)
    assert not verify(head, REAL, body=body)


PRESIGN_CASES = [
    ("s3-get", S3SigV4QueryAuth, "s3", "us-east-1", "GET", "https://bkt.s3.amazonaws.com/a%20key/x.txt"),
    ("s3-put-query", S3SigV4QueryAuth, "s3", "eu-west-2", "PUT",
     "https://s3.eu-west-2.amazonaws.com/bkt/k?x-id=PutObject&versionId=abc%2Fd"),
    ("sts-get", SigV4QueryAuth, "sts", "us-east-1", "GET",
     "https://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"),
]


@pytest.mark.parametrize("creds", [REAL, REAL_TOKEN], ids=["plain", "session-token"])
@pytest.mark.parametrize("case", PRESIGN_CASES, ids=[c[0] for c in PRESIGN_CASES])
def test_presign_and_represign_match_botocore(case: tuple, creds: Credentials) -> None:
    _, auth_cls, service, region, method, url = case
    want_req = boto_sign(auth_cls, creds, service, region, method, url, expires=900)
    want_sig = urlsplit(want_req.url).query.rsplit("X-Amz-Signature=", 1)[1]
    # Fresh presign of the bare URL.
    bare, _ = head_of(AWSRequest(method=method, url=url))
    ours = sigv4.presign(bare, creds, region, service, expires=900, now=FIXED)
    assert ours.target.rsplit("X-Amz-Signature=", 1)[1] == want_sig
    assert verify(ours, creds)
    # Re-sign of a URL the agent presigned with its placeholder.
    agent_req = boto_sign(auth_cls, Credentials(PLACEHOLDER.access_key, PLACEHOLDER.secret_key, "ph-token"),
                          service, region, method, url, expires=900)
    agent_head, _ = head_of(agent_req)
    out = resign(agent_head, creds, now=FIXED + dt.timedelta(minutes=3))
    assert out.target.rsplit("X-Amz-Signature=", 1)[1] == want_sig
    assert "X-Amz-Expires=900" in out.target and "X-Amz-Date=20240309T123456Z" in out.target
    assert ("X-Amz-Security-Token" in out.target) == bool(creds.token)
    assert PLACEHOLDER.access_key not in out.target and "ph-token" not in out.target
    assert verify(out, creds)


def test_known_answer_from_the_specification() -> None:
    """The GET ListUsers example of the SigV4 documentation, and its signing-key example."""
    key = sigv4.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", sigv4.Scope("20120215", "us-east-1", "iam"))
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    head = RequestHead("GET", "/?Action=ListUsers&Version=2010-05-08", Headers([
        ("Host", "iam.amazonaws.com"),
        ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
    ]))
    out = sign(head, Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), "us-east-1", "iam",
               now=dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.UTC), signed_headers=("content-type", "host", "x-amz-date"))
    assert out.headers.get("authorization") == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")


def test_canonical_pieces() -> None:
    assert sigv4.canonical_query("b=2&a=%7e&a=1&c") == "a=1&a=~&b=2&c="
    assert sigv4.canonical_query("X-Amz-Signature=x&q=a+b", exclude=("X-Amz-Signature",)) == "q=a%2Bb"
    assert sigv4.canonical_uri("/a/./b/../c//d%20e", s3=False) == "/a/c/d%2520e"
    assert sigv4.canonical_uri("/a/./b/../c//d%20e", s3=True) == "/a/./b/../c//d%20e"
    assert sigv4.canonical_uri("", s3=False) == "/"
    with pytest.raises(SigV4Error):
        sigv4.canonical_headers([("Host", "h")], ["host", "x-amz-date"])
    assert REAL_TOKEN.secret_key not in repr(REAL_TOKEN) and REAL_TOKEN.token not in repr(REAL_TOKEN)


def test_parse_authorization_errors() -> None:
    info = parse_authorization("AWS4-HMAC-SHA256 Credential=AK/20240101/eu-west-1/s3/aws4_request, "
                               "SignedHeaders=host;x-amz-date, Signature=abc")
    assert (info.access_key, info.scope.region, info.scope.service, info.signed_headers) == \
        ("AK", "eu-west-1", "s3", ("host", "x-amz-date"))
    for bad in ("Bearer x", "AWS4-HMAC-SHA256 Credential=AK/2024/x/s3/aws4_request, SignedHeaders=h, Signature=s",
                "AWS4-HMAC-SHA256 SignedHeaders=h, Signature=s"):
        with pytest.raises(SigV4Error):
            parse_authorization(bad)


# --- Integration: moto's server with IAM authentication on --------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto.server")
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0", AWS_DEFAULT_REGION="us-east-1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _set_no_auth_budget(url: str, n: int) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=str(n).encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})  # a form type would hide the body
    urllib.request.urlopen(req, timeout=5).read()


@pytest.fixture(scope="module")
def moto_user(moto_endpoint: str) -> Credentials:
    """An IAM user with an allow-all inline policy, created while auth is briefly relaxed."""
    import boto3

    _set_no_auth_budget(moto_endpoint, 3)
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="interlock-test")
    key = iam.create_access_key(UserName="interlock-test")["AccessKey"]
    iam.put_user_policy(UserName="interlock-test", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


def _send(url: str, head: RequestHead, body: bytes = b"") -> tuple[int, bytes]:
    req = urllib.request.Request(url + head.target, data=body or None, method=head.method)
    for k, v in head.headers:
        if k.lower() != "host":
            req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _sts_head(url: str) -> tuple[RequestHead, bytes]:
    body = b"Action=GetCallerIdentity&Version=2011-06-15"
    return RequestHead("POST", "/", Headers([("Host", urlsplit(url).netloc),
                                              ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
                                              ("Content-Length", str(len(body)))])), body


def test_moto_accepts_our_signature_and_refuses_bad_ones(moto_endpoint: str, moto_user: Credentials) -> None:
    head, body = _sts_head(moto_endpoint)
    signed = sign(head, moto_user, "us-east-1", "sts", body=body)
    status, out = _send(moto_endpoint, signed, body)
    assert status == 200, out
    assert b"interlock-test" in out
    # Wrong secret: refused.
    forged = sign(head, Credentials(moto_user.access_key, "wrong-secret"), "us-east-1", "sts", body=body)
    status, out = _send(moto_endpoint, forged, body)
    assert status == 403 and b"SignatureDoesNotMatch" in out
    # Signed, then the body changed: refused.
    status, out = _send(moto_endpoint, signed, b"Action=GetCallerIdentity&Version=2011-06-16")
    assert status == 403
    # The placeholder key is unknown to the service.
    status, out = _send(moto_endpoint, sign(head, PLACEHOLDER, "us-east-1", "sts", body=body), body)
    assert status == 403 and b"InvalidClientTokenId" in out


def test_boto3_with_placeholder_keys_works_through_resign(moto_endpoint: str, moto_user: Credentials,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the proxy does, done inside botocore's send hook: the SDK only ever knows the placeholder."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    monkeypatch.undo()  # real clock: moto checks request freshness
    session = boto3.session.Session(aws_access_key_id=PLACEHOLDER.access_key,
                                    aws_secret_access_key=PLACEHOLDER.secret_key, region_name="us-east-1")
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    seen_payload_hashes: set[str] = set()

    def proxy_hook(request, **_: object) -> None:
        body = request.body or b""
        if hasattr(body, "read"):
            body = body.read()
            request.body = body
        if isinstance(body, str):
            body = body.encode()
        head, _ = head_of(request)
        seen_payload_hashes.add(head.headers.get("x-amz-content-sha256", "(body hash)")[:40])
        out = resign(head, moto_user, body=body, placeholder=PLACEHOLDER)
        for k in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            if k in request.headers:
                del request.headers[k]
        for k, v in out.headers:
            if k.lower() in ("authorization", "x-amz-date", "x-amz-security-token"):
                request.headers[k] = v

    clients = {name: session.client(name, endpoint_url=moto_endpoint, config=cfg)
               for name in ("sts", "s3", "iam", "dynamodb")}
    for c in clients.values():
        c.meta.events.register("before-send", proxy_hook)

    assert clients["sts"].get_caller_identity()["Arn"].endswith("user/interlock-test")
    s3 = clients["s3"]
    s3.create_bucket(Bucket="interlock-bkt")
    s3.put_object(Bucket="interlock-bkt", Key="dir/a key+é.txt", Body=b"payload " * 1000)
    got = s3.get_object(Bucket="interlock-bkt", Key="dir/a key+é.txt")["Body"].read()
    assert got == b"payload " * 1000
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="interlock-bkt", Prefix="dir/")["Contents"]]
    assert keys == ["dir/a key+é.txt"]
    assert "interlock-test" in [u["UserName"] for u in clients["iam"].list_users()["Users"]]
    clients["dynamodb"].create_table(TableName="t", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                     BillingMode="PAY_PER_REQUEST")
    assert clients["dynamodb"].list_tables()["TableNames"] == ["t"]

    # Both paths were exercised: body-hashed services, and S3's declared x-amz-content-sha256.
    assert "(body hash)" in seen_payload_hashes and len(seen_payload_hashes) > 1
    # The same SDK without the proxy's re-signing is refused: the placeholder is worthless.
    bare = session.client("sts", endpoint_url=moto_endpoint, config=cfg)
    with pytest.raises(ClientError) as ei:
        bare.get_caller_identity()
    assert ei.value.response["Error"]["Code"] == "InvalidClientTokenId"


# Presigned URLs are checked against botocore only: moto's IAM-auth mode answers every presigned
# URL, even one botocore made with a valid key, with a 500.


def test_moto_accepts_resigned_streaming_trailer_upload(moto_endpoint: str, moto_user: Credentials) -> None:
    """STREAMING-UNSIGNED-PAYLOAD-TRAILER passes through: the body is never read to re-sign."""
    import boto3
    from botocore.config import Config

    real = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                        aws_access_key_id=moto_user.access_key, aws_secret_access_key=moto_user.secret_key,
                        config=Config(s3={"addressing_style": "path"}))
    real.create_bucket(Bucket="trailer-bkt")
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n"
    head = RequestHead("PUT", "/trailer-bkt/obj", Headers([
        ("Host", urlsplit(moto_endpoint).netloc), ("Content-Encoding", "aws-chunked"),
        ("X-Amz-Decoded-Content-Length", "11"), ("X-Amz-Trailer", "x-amz-checksum-crc32"),
        ("Content-Length", str(len(body))),
    ]))
    agent = sign(head, PLACEHOLDER, "us-east-1", "s3", payload_hash=sigv4.STREAMING_UNSIGNED_PAYLOAD_TRAILER)
    out = resign(agent, moto_user, placeholder=PLACEHOLDER)  # no body given: none needed
    status, resp = _send(moto_endpoint, out, body)
    assert status == 200, resp  # the signature was accepted (moto does not decode this framing itself)
    assert real.head_object(Bucket="trailer-bkt", Key="obj")["ResponseMetadata"]["HTTPStatusCode"] == 200
    forged = resign(agent, Credentials(moto_user.access_key, "wrong"))
    assert _send(moto_endpoint, forged, body)[0] == 403
