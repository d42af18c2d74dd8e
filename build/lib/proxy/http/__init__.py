"""HTTP/1.1 handling for the proxy: sans-IO parsing, re-serialisation, refusals, policy view, masking.

Nothing here touches a socket; the asyncio proxy feeds bytes in and writes the bytes it is given.

proxy.http.model
    AgentConnection()     agent side (we are the server). receive(bytes); events() yields
                          RequestHead, Body(data), End(trailers), Switched(trailing), Closed.
                          respond_head/respond_body/respond_end forward an origin response;
                          respond(status, headers, body) sends a whole one (refusals);
                          send_continue() answers Expect: 100-continue; must_close, switched,
                          trailing_data, expects_continue, request_complete.
    OriginConnection()    origin side (we are the client). send_head/send_body/send_end;
                          receive(bytes); events() yields ResponseHead (1xx too), Body, End, …
                          reusable says whether it can carry the next request.
    RequestHead / ResponseHead / Headers   editable, case-preserving heads.
    for_origin(head)      strip proxy-only fields and a TE-overridden Content-Length, origin-form
                          target, optionally drop Expect. for_agent(response_head) likewise.
    HttpProtocolError     .status is the status to answer with (respond_error()).
proxy.http.responses      Canned(status, headers, body): blocked(rule, reason) 403 JSON,
                          bad_gateway 502, gateway_timeout 504, bad_request 400.
proxy.http.rules          operation_from_request(head, scheme=…) -> policy.model.Operation.
proxy.http.masking        mask_json_bytes(body, MaskSpec) for MASK decisions;
                          redact_headers / redact_query for recordings.

A typical exchange: events() gives a RequestHead; judge operation_from_request(head); if refused,
write respond(*blocked(...)) and close when must_close; if allowed, send_continue() when
expects_continue, forward for_origin(head) through an OriginConnection and stream Body events both
ways as they come (response heads through for_agent); after respond_end() call events() again for a pipelined next request.
"""
