"""PostgreSQL building blocks for the relay: pure, sans-IO (bytes in, messages and decisions out).

Nothing here opens a socket or awaits; the asyncio relay owns the I/O and calls these. The
pieces, in the order a connection needs them:

wire        FrameReader("frontend"|"backend") frames a byte stream (startup phase, SSL/GSS
            negotiation, typed messages; max size → MessageTooLarge; anything else malformed →
            ProtocolError). Frames are zero-copy views valid until the next feed().
            parse_frontend/parse_backend(frame) → message dataclasses; every message has
            encode(). Encoders for synthesized replies: error_response, notice_response,
            ready_for_query, command_complete, row_description, data_row, authentication_ok,
            parameter_status, backend_key_data; and for the upstream login: startup_message,
            password_message, sasl_initial_response, sasl_response, ssl_request,
            cancel_request, query, terminate.
scram       UpstreamAuthenticator(user, secret, allow=...) answers the server's
            Authentication* messages (SCRAM-SHA-256 with server-signature check, md5 and
            cleartext only if allowed); ScramClient, md5_password, saslprep underneath.
statements  SqlAnalyzer().analyze(sql) → [policy.model.Operation] for every statement,
            including writes hidden in CTEs, EXPLAIN ANALYZE, COPY (query), dynamic-SQL
            functions and prepared statements; parser failures → action "unparseable".
            register_prepared(name, sql) for protocol-level Parse.
masking     RowMasker(row_description, MaskSpec.from_names(decision.mask)).mask(datarow)
            → rewritten DataRow bytes or None (unchanged); mask_copy_data, mask_text.
            Detectors live in policy.detectors (shared with HTTP).

A relay loop, roughly:

    client = FrameReader("frontend"); server = FrameReader("backend")
    client.feed(data)
    for frame in client:
        msg = parse_frontend(frame) if frame.type in (b"Q", b"P", b"") else None
        ops = analyzer.analyze(msg.sql) if isinstance(msg, Query) else ...
        ...forward frame.data, or send error_response(...) + ready_for_query(status)...
    server.feed(data)
    for frame in server:
        if frame.type == b"T": masker = RowMasker(parse_backend(frame), spec)
        if frame.type == b"D" and masker: out = masker.mask(frame.data) or frame.data
"""
