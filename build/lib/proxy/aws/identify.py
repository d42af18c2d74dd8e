"""What an AWS request does, from its head and the first bytes of its body.

Why not trust one field: the SDK leaves several traces and each protocol family keeps the
operation somewhere else — the SigV4 credential scope names the service and region; JSON
protocols put "Prefix.Operation" in X-Amz-Target; query protocols put Action= in the query or the
form body; Smithy RPCv2 puts it in the path; S3 is REST, where the operation is implied by the
method, whether a bucket and key are addressed, and which subresource (?acl, ?uploads…) is named.
Hints the SDK adds for itself, like S3's ?x-id=PutObject, are ignored: the method decides, since
that is what the service acts on.

Identification never raises on odd input; what cannot be named becomes action "Unknown" with the
risk flag "unidentified-action", so a policy can refuse what it does not understand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from policy.model import Operation
from proxy.http.model import Headers, RequestHead

from .sigv4 import S3_LIKE_SERVICES, SigV4Error, auth_info

# Signing name -> IAM action prefix, where they differ.
IAM_PREFIX = {"monitoring": "cloudwatch", "email": "ses", "s3-object-lambda": "s3-object-lambda"}
GLOBAL_SERVICES = {"iam": "us-east-1", "sts": "us-east-1", "route53": "us-east-1", "cloudfront": "us-east-1",
                   "organizations": "us-east-1"}

UNKNOWN = "Unknown"

# Endpoint prefixes that are also the signing name, so a scope naming another service is a lie.
_PLAIN_ENDPOINTS = frozenset({"iam", "sts", "ec2", "dynamodb", "sqs", "sns", "lambda", "kms", "secretsmanager",
                              "ssm", "logs", "monitoring", "rds", "cloudformation", "events", "states"})

# Former query-protocol services now on JSON/CBOR: their SDKs still expect the old error codes.
QUERY_COMPATIBLE = frozenset({"sqs", "monitoring"})

# S3 subresources on a bucket: name -> (GET, PUT, DELETE) operation.
_BUCKET_SUB: dict[str, tuple[str | None, str | None, str | None]] = {
    "acl": ("GetBucketAcl", "PutBucketAcl", None),
    "policy": ("GetBucketPolicy", "PutBucketPolicy", "DeleteBucketPolicy"),
    "policyStatus": ("GetBucketPolicyStatus", None, None),
    "cors": ("GetBucketCors", "PutBucketCors", "DeleteBucketCors"),
    "lifecycle": ("GetBucketLifecycleConfiguration", "PutBucketLifecycleConfiguration", "DeleteBucketLifecycle"),
    "versioning": ("GetBucketVersioning", "PutBucketVersioning", None),
    "tagging": ("GetBucketTagging", "PutBucketTagging", "DeleteBucketTagging"),
    "website": ("GetBucketWebsite", "PutBucketWebsite", "DeleteBucketWebsite"),
    "encryption": ("GetBucketEncryption", "PutBucketEncryption", "DeleteBucketEncryption"),
    "logging": ("GetBucketLogging", "PutBucketLogging", None),
    "notification": ("GetBucketNotificationConfiguration", "PutBucketNotificationConfiguration", None),
    "replication": ("GetBucketReplication", "PutBucketReplication", "DeleteBucketReplication"),
    "publicAccessBlock": ("GetPublicAccessBlock", "PutPublicAccessBlock", "DeletePublicAccessBlock"),
    "ownershipControls": ("GetBucketOwnershipControls", "PutBucketOwnershipControls",
                          "DeleteBucketOwnershipControls"),
    "object-lock": ("GetObjectLockConfiguration", "PutObjectLockConfiguration", None),
    "accelerate": ("GetBucketAccelerateConfiguration", "PutBucketAccelerateConfiguration", None),
    "requestPayment": ("GetBucketRequestPayment", "PutBucketRequestPayment", None),
    "location": ("GetBucketLocation", None, None),
    "uploads": ("ListMultipartUploads", None, None),
    "versions": ("ListObjectVersions", None, None),
}
# Configurations addressed by ?name&id=…: GET without id lists them.
_BUCKET_ID_SUB = {
    "analytics": "BucketAnalyticsConfiguration", "metrics": "BucketMetricsConfiguration",
    "inventory": "BucketInventoryConfiguration", "intelligent-tiering": "BucketIntelligentTieringConfiguration",
}
_OBJECT_SUB: dict[str, tuple[str | None, str | None, str | None]] = {
    "acl": ("GetObjectAcl", "PutObjectAcl", None),
    "tagging": ("GetObjectTagging", "PutObjectTagging", "DeleteObjectTagging"),
    "retention": ("GetObjectRetention", "PutObjectRetention", None),
    "legal-hold": ("GetObjectLegalHold", "PutObjectLegalHold", None),
    "attributes": ("GetObjectAttributes", None, None),
    "torrent": ("GetObjectTorrent", None, None),
}
# S3 API operation -> IAM action, where the names differ; what a policy written in IAM terms needs.
S3_IAM_ACTION = {
    "ListBuckets": "ListAllMyBuckets", "ListObjects": "ListBucket", "ListObjectsV2": "ListBucket",
    "HeadBucket": "ListBucket", "ListObjectVersions": "ListBucketVersions", "HeadObject": "GetObject",
    "CreateMultipartUpload": "PutObject", "UploadPart": "PutObject", "CompleteMultipartUpload": "PutObject",
    "CopyObject": "PutObject", "UploadPartCopy": "PutObject", "ListParts": "ListMultipartUploadParts",
    "ListMultipartUploads": "ListBucketMultipartUploads", "DeleteObjects": "DeleteObject",
    "GetBucketLifecycleConfiguration": "GetLifecycleConfiguration",
    "PutBucketLifecycleConfiguration": "PutLifecycleConfiguration", "DeleteBucketLifecycle": "PutLifecycleConfiguration",
    "GetBucketCors": "GetBucketCORS", "PutBucketCors": "PutBucketCORS", "DeleteBucketCors": "PutBucketCORS",
    "GetBucketEncryption": "GetEncryptionConfiguration", "PutBucketEncryption": "PutEncryptionConfiguration",
    "DeleteBucketEncryption": "PutEncryptionConfiguration",
    "GetBucketReplication": "GetReplicationConfiguration", "PutBucketReplication": "PutReplicationConfiguration",
    "DeleteBucketReplication": "PutReplicationConfiguration",
    "GetPublicAccessBlock": "GetBucketPublicAccessBlock", "PutPublicAccessBlock": "PutBucketPublicAccessBlock",
    "DeletePublicAccessBlock": "PutBucketPublicAccessBlock",
    "GetBucketNotificationConfiguration": "GetBucketNotification",
    "PutBucketNotificationConfiguration": "PutBucketNotification", "DeleteBucketTagging": "PutBucketTagging",
    "SelectObjectContent": "GetObject", "PostObject": "PutObject", "GetObjectAttributes": "GetObjectAttributes",
}

# Operations that widen who may do what: flagged whatever the service.
_PERMISSION_CHANGES = re.compile(
    r"^(Put\w*Policy|Attach\w*Policy|Put\w*Acl|Create(AccessKey|LoginProfile|PolicyVersion)|UpdateAssumeRolePolicy|"
    r"AddPermission|AddUserToGroup|(Put|Delete)PublicAccessBlock|SetDefaultPolicyVersion|UpdateLoginProfile|"
    r"CreateGrant|PutBucketOwnershipControls)$")
_DESTRUCTIVE = re.compile(r"^(Delete|Terminate|Remove|Purge|Drop|Destroy|Deregister|Disable|Stop|Revoke|Abort)")

# Request fields that name what a JSON-protocol call touches, per service where it matters.
_JSON_RESOURCE_FIELDS = (
    "TableName", "TableArn", "GlobalTableName", "QueueUrl", "QueueName", "FunctionName", "SecretId", "Name",
    "KeyId", "LogGroupName", "LogStreamName", "StreamName", "StreamARN", "StateMachineArn", "TopicArn",
    "ResourceArn", "RuleName", "EventBusName", "ClusterName", "Bucket", "RepositoryName", "Names",
)
_QUERY_RESOURCE_PARAMS = re.compile(
    r"^(UserName|RoleName|GroupName|PolicyArn|InstanceProfileName|QueueUrl|QueueName|TopicArn|TargetArn|"
    r"InstanceId(\.\d+)?|InstanceIds\.member\.\d+|VolumeId(\.\d+)?|GroupId(\.\d+)?|SnapshotId(\.\d+)?|ImageId(\.\d+)?|"
    r"VpcId|SubnetId|DBInstanceIdentifier|DBClusterIdentifier|StackName|RoleArn|AlarmNames\.member\.\d+|"
    r"LoadBalancerName|LoadBalancerArn|SubscriptionArn|Namespace)$")

_LAMBDA_PATHS = (
    ("POST", re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$"), "Invoke"),
    ("POST", re.compile(r"^/2014-11-13/functions/([^/]+)/invoke-async/?$"), "InvokeAsync"),
    ("GET", re.compile(r"^/2015-03-31/functions/?$"), "ListFunctions"),
    ("POST", re.compile(r"^/2015-03-31/functions/?$"), "CreateFunction"),
    ("GET", re.compile(r"^/2015-03-31/functions/([^/]+)/?$"), "GetFunction"),
    ("DELETE", re.compile(r"^/2015-03-31/functions/([^/]+)/?$"), "DeleteFunction"),
    ("PUT", re.compile(r"^/2015-03-31/functions/([^/]+)/code$"), "UpdateFunctionCode"),
    ("PUT", re.compile(r"^/2015-03-31/functions/([^/]+)/configuration$"), "UpdateFunctionConfiguration"),
    ("GET", re.compile(r"^/2015-03-31/functions/([^/]+)/configuration$"), "GetFunctionConfiguration"),
    ("POST", re.compile(r"^/2015-03-31/functions/([^/]+)/policy$"), "AddPermission"),
    ("GET", re.compile(r"^/2015-03-31/functions/([^/]+)/policy$"), "GetPolicy"),
    ("DELETE", re.compile(r"^/2015-03-31/functions/([^/]+)/policy/[^/]+$"), "RemovePermission"),
    ("PUT", re.compile(r"^/2021-10-31/functions/([^/]+)/url$"), "UpdateFunctionUrlConfig"),
    ("POST", re.compile(r"^/2021-10-31/functions/([^/]+)/url$"), "CreateFunctionUrlConfig"),
)


@dataclass(frozen=True)
class AwsCall:
    """One identified AWS API call.

    family picks the error shape the SDK expects: "s3" (REST-XML, S3 flavour), "rest-xml",
    "query" (XML ErrorResponse), "ec2" (XML Response/Errors), "json" (awsJson 1.0/1.1), "rest-json",
    "rpcv2-cbor".
    """

    service: str  # signing name, e.g. "s3", "dynamodb", "monitoring"
    region: str
    action: str  # API operation name, e.g. "DeleteBucket", "GetItem"; "Unknown" when not identified
    family: str
    resources: tuple[str, ...] = ()
    bucket: str | None = None
    key: str | None = None
    access_key: str | None = None
    presigned: bool = False
    json_version: str | None = None  # "1.0" / "1.1" for awsJson
    query_compatible: bool = False  # awsJson service that also speaks query errors (SQS)
    extra: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def iam_prefix(self) -> str:
        return IAM_PREFIX.get(self.service, self.service)

    @property
    def iam_action(self) -> str:
        """The action in IAM words (s3:ListBucket for ListObjectsV2), for policies written that way."""
        if self.service in S3_LIKE_SERVICES:
            return f"s3:{S3_IAM_ACTION.get(self.action, self.action)}"
        return f"{self.iam_prefix}:{self.action}"

    @property
    def risks(self) -> tuple[str, ...]:
        r: list[str] = []
        if self.action == UNKNOWN:
            r.append("unidentified-action")
        if _DESTRUCTIVE.match(self.action):
            r.append("delete" if self.action.startswith(("Delete", "Terminate", "Purge", "Drop", "Destroy", "Remove"))
                     else "disruptive")
        if _PERMISSION_CHANGES.match(self.action):
            r.append("permission-change")
        if self.action in ("PutBucketAcl", "PutObjectAcl") and "public" in self.extra.get("acl", ""):
            r.append("public-access")
        if self.presigned:
            r.append("presigned")
        if self.extra.get("objects_truncated") == "true":
            r.append("objects-truncated")
        if "host_service" in self.extra:
            r.append("service-mismatch")
        if self.extra.get("ambiguous") == "true":
            r.append("ambiguous-action")
        return tuple(r)

    def operation(self) -> Operation:
        action = f"{self.iam_prefix}:{self.action}"
        summary = f"{action} {', '.join(self.resources[:5])}".strip()
        if len(self.resources) > 5:
            summary += f" (+{len(self.resources) - 5} more)"
        summary += f" [{self.region}]"
        attrs = {"service": self.service, "region": self.region, "api": self.action, "family": self.family,
                 "iam_action": self.iam_action, "presigned": "true" if self.presigned else "false", **self.extra}
        if self.bucket is not None:
            attrs["bucket"] = self.bucket
        if self.key is not None:
            attrs["key"] = self.key
        if self.access_key:
            attrs["access_key"] = self.access_key
        return Operation(protocol="aws", action=action, objects=self.resources, risks=self.risks,
                         summary=summary[:1000], attributes=attrs)


def _as_headers(headers: Headers | Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    if isinstance(headers, Headers):
        return headers
    if isinstance(headers, Mapping):
        return Headers(list(headers.items()))
    return Headers(list(headers))


def _strip_port(host: str) -> str:
    h = host.strip().lower().rstrip(".")
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _service_region_from_host(host: str) -> tuple[str | None, str | None]:
    """'dynamodb.eu-west-1.amazonaws.com' -> ('dynamodb', 'eu-west-1'); S3 virtual hosts too."""
    if not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None, None
    labels = host.split(".")
    for i, lab in enumerate(labels):
        if lab == "s3" or lab.startswith("s3-") and lab not in ("s3-control",):
            region = None
            if lab.startswith("s3-") and lab not in ("s3-accelerate", "s3-fips", "s3-accesspoint", "s3-external-1"):
                region = lab[3:]
            elif i + 1 < len(labels) and re.match(r"^[a-z]{2}(-gov)?-[a-z]+-\d$", labels[i + 1]):
                region = labels[i + 1]
            elif i + 2 < len(labels) and labels[i + 1] == "dualstack":
                region = labels[i + 2]
            return "s3", region
    svc = labels[0].removesuffix("-fips")
    region = labels[1] if len(labels) > 3 and re.match(r"^[a-z]{2}(-gov)?-[a-z]+-\d$", labels[1]) else None
    return svc, region


def s3_bucket_from_host(host: str, suffixes: Iterable[str] = ()) -> str | None:
    """The bucket of a virtual-hosted-style S3 request, or None for path style.

    suffixes: extra S3 endpoint names that take buckets as a subdomain ("s3.internal.example"),
    for S3-compatible stores the agent is pointed at.
    """
    h = _strip_port(host)
    for sfx in suffixes:
        sfx = sfx.lower().strip(".")
        if h.endswith("." + sfx):
            return h[: -len(sfx) - 1]
    if not h.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None
    labels = h.split(".")
    for i, lab in enumerate(labels):
        if lab == "s3" or lab.startswith("s3-"):
            return ".".join(labels[:i]) or None
    return None


def _s3_operation(method: str, bucket: str | None, key: str | None, params: dict[str, str],
                  headers: Headers) -> str:
    m = method.upper()
    col = {"GET": 0, "HEAD": 0, "PUT": 1, "DELETE": 2}.get(m)
    if bucket is None:
        return "ListBuckets" if m == "GET" else UNKNOWN
    if key is None:
        for sub, ops in _BUCKET_SUB.items():
            if sub in params and col is not None:
                if m == "HEAD":
                    return UNKNOWN
                return ops[col] or UNKNOWN
        for sub, noun in _BUCKET_ID_SUB.items():
            if sub in params:
                if m == "GET":
                    return f"Get{noun}" if "id" in params else f"List{noun}s"
                return {"PUT": f"Put{noun}", "DELETE": f"Delete{noun}"}.get(m, UNKNOWN)
        if m == "GET":
            return "ListObjectsV2" if params.get("list-type") == "2" else "ListObjects"
        if m == "PUT":
            return "CreateBucket"
        if m == "DELETE":
            return "DeleteBucket"
        if m == "HEAD":
            return "HeadBucket"
        if m == "POST":
            if "delete" in params:
                return "DeleteObjects"
            return "PostObject"  # browser-form upload
        return UNKNOWN
    copy = "x-amz-copy-source" in headers
    if "uploadId" in params:
        if m == "PUT" and "partNumber" in params:
            return "UploadPartCopy" if copy else "UploadPart"
        return {"GET": "ListParts", "POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload"}.get(m, UNKNOWN)
    if m == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "restore" in params:
            return "RestoreObject"
        if "select" in params:
            return "SelectObjectContent"
        return UNKNOWN
    for sub, ops in _OBJECT_SUB.items():
        if sub in params and col is not None:
            if m == "HEAD":
                return UNKNOWN
            return ops[col] or UNKNOWN
    if m == "PUT":
        return "CopyObject" if copy else "PutObject"
    return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(m, UNKNOWN)


def _s3_arn(bucket: str, key: str | None = None) -> str:
    return f"arn:aws:s3:::{bucket}" + (f"/{key}" if key is not None else "")


def _delete_object_keys(body: bytes) -> tuple[list[str], bool]:
    """Keys named in a DeleteObjects body prefix; truncated says the list may be incomplete."""
    text = body.decode("utf-8", errors="replace")
    keys = [_xml_unescape(k) for k in re.findall(r"<Key>(.*?)</Key>", text, flags=re.S)]
    return keys, "</Delete>" not in text


def _xml_unescape(s: str) -> str:
    return (s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'")
            .replace("&amp;", "&"))


def _identify_s3(method: str, host: str, path: str, params: dict[str, str], headers: Headers, body: bytes,
                 region: str, suffixes: Iterable[str]) -> tuple[str, str | None, str | None, list[str], dict[str, str]]:
    extra: dict[str, str] = {}
    bucket = s3_bucket_from_host(host, suffixes)
    if bucket is not None:
        key = unquote(path[1:]) if len(path) > 1 else None
        extra["addressing"] = "virtual"
        if ".s3-accesspoint." in _strip_port(host):
            extra["access_point"] = "true"
    else:
        rest = path[1:] if path.startswith("/") else path
        b, slash, k = rest.partition("/")
        bucket = unquote(b) or None
        key = unquote(k) if slash and k else None
        extra["addressing"] = "path"
    action = _s3_operation(method, bucket, key, params, headers)
    resources: list[str] = []
    if bucket is not None:
        resources.append(_s3_arn(bucket, key))
    if action in ("CopyObject", "UploadPartCopy"):
        src = unquote(headers.get("x-amz-copy-source") or "").lstrip("/").split("?", 1)[0]
        if src:
            resources.append(f"arn:aws:s3:::{src}")
            extra["copy_source"] = src
    if action == "DeleteObjects" and bucket is not None:
        keys, truncated = _delete_object_keys(body)
        resources = [_s3_arn(bucket, k) for k in keys] or [_s3_arn(bucket)]
        if truncated:
            extra["objects_truncated"] = "true"
    acl = headers.get("x-amz-acl")
    if acl:
        extra["acl"] = acl.lower()
    return action, bucket, key, resources, extra


def _parse_json_prefix(body: bytes) -> dict[str, object] | None:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _json_resources(service: str, region: str, doc: dict[str, object] | None, body: bytes) -> tuple[list[str], bool]:
    """Named resources of a JSON request; from a partial body, the string fields a regex can see."""
    found: list[tuple[str, str]] = []
    truncated = doc is None and bool(body)
    if doc is not None:
        for f in _JSON_RESOURCE_FIELDS:
            v = doc.get(f)
            if isinstance(v, str):
                found.append((f, v))
            elif isinstance(v, list):
                found.extend((f, x) for x in v if isinstance(x, str))
        items = doc.get("RequestItems")
        if isinstance(items, dict):  # DynamoDB batch operations: table names are the keys
            found.extend(("TableName", t) for t in items)
        for t in doc.get("TransactItems", []) if isinstance(doc.get("TransactItems"), list) else []:
            if isinstance(t, dict):
                for op in t.values():
                    if isinstance(op, dict) and isinstance(op.get("TableName"), str):
                        found.append(("TableName", op["TableName"]))
    elif body:
        text = body.decode("utf-8", errors="replace")
        for f in _JSON_RESOURCE_FIELDS:
            for m in re.finditer(rf'"{f}"\s*:\s*"((?:[^"\\]|\\.)*)"', text):
                found.append((f, m.group(1)))
    out: list[str] = []
    for f, v in found:
        if v.startswith("arn:"):
            r = v
        elif service == "dynamodb" and f == "TableName":
            r = f"arn:aws:dynamodb:{region}:*:table/{v}"
        elif service == "lambda" and f == "FunctionName":
            r = f"arn:aws:lambda:{region}:*:function:{v}"
        else:
            r = f"{IAM_PREFIX.get(service, service)}:{f}/{v}"
        if r not in out:
            out.append(r)
    return out, truncated


def _query_resources(service: str, region: str, params: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for name, v in params.items():
        if not _QUERY_RESOURCE_PARAMS.match(name) or not v:
            continue
        base = re.sub(r"(\.member)?\.\d+$", "", name)
        if v.startswith("arn:"):
            r = v
        elif service == "iam" and base in ("UserName", "RoleName", "GroupName", "InstanceProfileName"):
            kind = {"UserName": "user", "RoleName": "role", "GroupName": "group",
                    "InstanceProfileName": "instance-profile"}[base]
            r = f"arn:aws:iam::*:{kind}/{v}"
        elif service == "ec2" and base in ("InstanceId", "InstanceIds", "VolumeId", "SnapshotId", "ImageId",
                                            "VpcId", "SubnetId", "GroupId"):
            kind = {"InstanceId": "instance", "InstanceIds": "instance", "VolumeId": "volume",
                    "SnapshotId": "snapshot", "ImageId": "image", "VpcId": "vpc", "SubnetId": "subnet",
                    "GroupId": "security-group"}[base]
            r = f"arn:aws:ec2:{region}:*:{kind}/{v}"
        else:
            r = f"{IAM_PREFIX.get(service, service)}:{base}/{v}"
        if r not in out:
            out.append(r)
    return out


def identify(method: str, host: str, path: str, query: str,
             headers: Headers | Mapping[str, str] | Iterable[tuple[str, str]], body_prefix: bytes = b"", *,
             s3_virtual_suffixes: Iterable[str] = ()) -> AwsCall | None:
    """Name the AWS call, or None when nothing marks the request as AWS (no SigV4, not an AWS host).

    path and query are raw (still percent-encoded), as on the wire. body_prefix: as much of the
    body as the caller buffered (a few KiB is enough for query and JSON protocols; S3 needs none,
    except DeleteObjects to list its keys).
    """
    hdrs = _as_headers(headers)
    hostname = _strip_port(host)
    target = path + (f"?{query}" if query else "")
    try:
        info = auth_info(RequestHead(method, target or "/", hdrs))
    except SigV4Error:
        info = None
    host_service, host_region = _service_region_from_host(hostname)
    if info is not None:
        service, region = info.scope.service, info.scope.region
    elif host_service is not None:
        service, region = host_service, host_region or GLOBAL_SERVICES.get(host_service, "us-east-1")
    else:
        return None
    params = dict(parse_qsl(query, keep_blank_values=True))
    ctype = (hdrs.get("content-type") or "").split(";", 1)[0].strip().lower()
    amz_target = hdrs.get("x-amz-target")
    ak, pre = (info.access_key if info else None), bool(info and info.presigned)
    extra: dict[str, str] = {"host": hostname, "method": method.upper()}
    if host_service is not None and (
            (host_service == "s3") != (service in S3_LIKE_SERVICES)
            or (host_service in _PLAIN_ENDPOINTS and host_service != service)):
        # The signature names one service, the host another: AWS will refuse it, but the policy
        # should not judge it under the name the agent chose.
        extra["host_service"] = host_service
    if amz_target and ("Action" in params or (ctype == "application/x-www-form-urlencoded"
                                               and b"Action=" in body_prefix)):
        extra["ambiguous"] = "true"

    if ".s3-control." in hostname or hostname.startswith("s3-control."):
        # S3 Control (account-level settings, access points, batch jobs) signs as "s3" but is not
        # bucket/key REST; it is left unidentified rather than misread as object operations.
        extra["path"] = path
        extra.pop("host_service", None)
        return AwsCall(service, region, UNKNOWN, "rest-xml", (), extra=extra, access_key=ak, presigned=pre)

    # S3 acts on method and path whatever other headers say: a stray X-Amz-Target must not
    # relabel a DELETE.
    if service in S3_LIKE_SERVICES:
        action, bucket, key, resources, s3extra = _identify_s3(method, host, path, params, hdrs, body_prefix, region,
                                                               s3_virtual_suffixes)
        extra.update(s3extra)
        return AwsCall(service, region, action, "s3", tuple(resources), bucket=bucket, key=key, extra=extra,
                       access_key=ak, presigned=pre)

    if amz_target:
        action = amz_target.rsplit(".", 1)[-1].strip() or UNKNOWN
        version = ctype.rsplit("-", 1)[-1] if ctype.startswith("application/x-amz-json-") else "1.0"
        doc = _parse_json_prefix(body_prefix)
        resources, truncated = _json_resources(service, region, doc, body_prefix)
        if truncated:
            extra["objects_truncated"] = "true"
        extra["target"] = amz_target
        return AwsCall(service, region, action, "json", tuple(resources), json_version=version,
                       query_compatible=service in QUERY_COMPATIBLE, extra=extra, access_key=ak, presigned=pre)

    rpc = re.match(r"^/service/([^/]+)/operation/([^/]+)$", path)
    if rpc and (hdrs.get("smithy-protocol") or "").lower() == "rpc-v2-cbor":
        extra["smithy_service"] = unquote(rpc.group(1))
        return AwsCall(service, region, unquote(rpc.group(2)), "rpcv2-cbor", (),
                       query_compatible=service in QUERY_COMPATIBLE, extra=extra, access_key=ak, presigned=pre)

    form: dict[str, str] = {}
    if ctype == "application/x-www-form-urlencoded" and body_prefix:
        form = dict(parse_qsl(body_prefix.decode("utf-8", errors="replace"), keep_blank_values=True))
    action_name = params.get("Action") or form.get("Action")
    if action_name:
        merged = {**params, **form}
        family = "ec2" if service == "ec2" else "query"
        if "Version" in merged:
            extra["api_version"] = merged["Version"]
        return AwsCall(service, region, action_name, family, tuple(_query_resources(service, region, merged)),
                       extra=extra, access_key=ak, presigned=pre)

    if service == "lambda":
        for m, rx, op in _LAMBDA_PATHS:
            hit = rx.match(path)
            if hit and method.upper() == m:
                res = (f"arn:aws:lambda:{region}:*:function:{unquote(hit.group(1))}",) if hit.groups() else ()
                return AwsCall(service, region, op, "rest-json", res, extra=extra, access_key=ak, presigned=pre)
    extra["path"] = path
    return AwsCall(service, region, UNKNOWN, "rest-json", (), extra=extra, access_key=ak, presigned=pre)


def identify_request(head: RequestHead, body_prefix: bytes = b"", *,
                     s3_virtual_suffixes: Iterable[str] = ()) -> AwsCall | None:
    """identify() for a parsed request head."""
    return identify(head.method, head.authority, head.path, head.query, head.headers, body_prefix,
                    s3_virtual_suffixes=s3_virtual_suffixes)
