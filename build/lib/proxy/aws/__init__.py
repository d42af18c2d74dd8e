"""AWS awareness for the proxy: what a request does, re-signing it with real keys, AWS-shaped refusals.

The agent holds placeholder credentials only. For each AWS request the proxy:
  1. identify.identify(method, host, path, query, headers, body_prefix) -> AwsCall, whose
     .operation() is the policy.model.Operation ("aws", "s3:DeleteBucket", objects "arn:aws:s3:::b/k");
  2. asks the policy; on refusal answers with errors.access_denied(call, reason) — an AWS error in
     the protocol family of that service, so the SDK raises its usual AccessDenied exception;
  3. on allow, sigv4.resign(head, real_credentials, placeholder=..., body=...) and forwards.

proxy.aws.identify
    identify(method, host, path, query, headers, body_prefix=b"", s3_virtual_suffixes=()) -> AwsCall | None
    identify_request(head, body_prefix) — same from a RequestHead. None: nothing marks it as AWS.
    AwsCall: service (signing name), region, action (API operation or "Unknown"), family (error
    shape), resources (ARN-like), bucket/key, access_key, presigned; .iam_action; .operation().
    body_prefix: a few KiB suffice (query/JSON protocols, DeleteObjects keys); S3 needs none.
proxy.aws.errors
    access_denied(call, rule, reason) -> Canned (send with AgentConnection.respond(*canned));
    aws_error(family, code, message, status=...) for other AWS-shaped answers.
proxy.aws.sigv4
    Credentials(access_key, secret_key, token=None)
    resign(head, creds, *, body=None, placeholder=None, now=None, refresh_date=True) -> RequestHead
        header-signed and presigned requests; S3 declared payload hashes (incl. UNSIGNED-PAYLOAD and
        STREAMING-UNSIGNED-PAYLOAD-TRAILER) need no body; other services need body= for the hash.
    sign(head, creds, region, service, ...) / presign(head, creds, region, service, expires=...)
    verify(head, creds, body=None) -> bool; auth_info(head) -> AuthInfo | None
    SigV4Error: cannot (re)sign (SigV4a, chunk-signed uploads, SigV2, foreign key): refuse the request.
"""
