"""PostgreSQL building blocks for the relay: pure, sans-IO (bytes in, messages and decisions out).

Nothing here opens a socket or awaits; the asyncio relay owns the I/O and calls these. The
pieces, in the order a connection needs them:

wire        FrameReader("frontend"|"backend") frames one direction of a stream: the untyped
            startup phase (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest), the
            one-byte answer to an encryption request (after expect_encryption_response()), then
            typed messages. Oversized length headers raise MessageTooLarge before the body is
            buffered; anything else malformed raises ProtocolError (its base class) — nothing
            else. Frames are zero-copy views (type, offset, data) valid until the next feed().
            parse_frontend / parse_backend(frame) → message dataclasses; every message has
            encode(). Encoders for synthesized replies: error_response, notice_response,
            ready_for_query, command_complete, row_description, data_row, authentication_ok,
            parameter_status, backend_key_data; for the upstream login: startup_message,
            password_message, sasl_initial_response, sasl_response, ssl_request,
            cancel_request, query, sync, terminate.
scram       UpstreamAuthenticator(user, secret, allow=...).handle(msg) → bytes to send upstream
            (or None) for each Authentication* message; `done` after a verified
            AuthenticationOk. SCRAM-SHA-256 (-PLUS with channel binding) by default; md5 and
            cleartext only when the credential allows them. ScramClient, md5_password and
            saslprep underneath.
statements  SqlAnalyzer() per client session; analyze(sql) → [policy.model.Operation] for every
            statement, including writes hidden in CTEs, ON CONFLICT, COPY (query), EXPLAIN
            ANALYZE, dynamic-SQL functions and EXECUTE of prepared statements; parser failures
            → action "unparseable". register_prepared(name, sql) for protocol-level Parse.
masking     RowMasker(row_description, MaskSpec.from_names(decision.mask), result_formats)
            .mask(datarow_bytes) → rewritten DataRow bytes, or None when unchanged (forward the
            original frame); mask_copy_data for COPY TO STDOUT, mask_text for recordings.
            The detectors are protocol-neutral, in policy.detectors.

A relay loop, roughly:

    client, server = FrameReader("frontend"), FrameReader("backend")
    client.feed(chunk)
    for frame in client:
        if frame.type == b"Q":
            ops = analyzer.analyze(parse_frontend(frame).sql)   # judge all; refuse the whole
            ...                                                  # string if any op is refused:
            send(error_response("ERROR", "42501", why) + ready_for_query(status))
        else:
            forward(frame.data)
    server.feed(chunk)
    for frame in server:
        if frame.type == b"T": masker = RowMasker(parse_backend(frame), spec)
        if frame.type == b"D": forward(masker.mask(frame.data) or frame.data)

What the relay must still do itself (these modules cannot see it):
- extended protocol: judge Parse SQL via register_prepared (the unnamed statement too) and
  refuse at Execute; after an error, discard frontend messages until Sync; Bind's result
  formats, not a Describe(statement) RowDescription, tell RowMasker which columns are binary;
- FunctionCall ('F') runs a function by OID with no SQL to judge: refuse it, or resolve the OID;
- keep client_encoding UTF8 (SQL is decoded as UTF-8; SET client_encoding is a "set" op);
- TLS: after an accepted encryption request call start_tls() before the handshake (it refuses
  plaintext bytes pipelined ahead of it);
- CancelRequest arrives on a new connection with the key the proxy gave the client: map it to the
  upstream BackendKeyData;
- MessageTooLarge/ProtocolError: send a FATAL error_response and close.
"""

import policy  # noqa: E402,F401 - installs policy.compiled's guard before any module here is imported
