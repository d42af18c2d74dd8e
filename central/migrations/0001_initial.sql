-- The central recorder's store. `records` is the truth: every host's chain, bodies verbatim.
-- `sessions`, `approvals` and records.session are an index derived from records at ingest
-- (rebuildable from records); `findings` and `refusals` are what ingest saw go wrong.

CREATE TABLE hosts (
    host_id      text PRIMARY KEY,
    name         text NOT NULL,
    signing_key  text NOT NULL,            -- Ed25519 public key, 32 bytes hex: checks the host's checkpoints
    cert_serial  text NOT NULL,            -- the client certificate issued at join (hex)
    token_id     text NOT NULL,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    revoked_reason text
);

CREATE TABLE enrolment_tokens (
    id             text PRIMARY KEY,
    secret_sha256  bytea NOT NULL,         -- never the secret itself
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    used_by        text,
    note           text NOT NULL DEFAULT ''
);

-- Where each host's stored chain ends; locked (FOR UPDATE) by every ingest of that host, so two
-- recorder instances never interleave one host's batches.
CREATE TABLE chain_heads (
    host_id     text PRIMARY KEY REFERENCES hosts(host_id),
    seq         bigint NOT NULL DEFAULT 0,
    hash        bytea NOT NULL,            -- H(seq); 32 zero bytes while seq = 0
    signed_seq  bigint NOT NULL DEFAULT 0, -- the highest seq covered by a valid checkpoint
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE records (
    host_id      text NOT NULL,
    seq          bigint NOT NULL,
    kind         text NOT NULL,
    body         text NOT NULL,            -- verbatim, as hashed
    hash         bytea NOT NULL,           -- H(seq)
    session      text,                     -- derived: the session the record belongs to (an index column)
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, seq)
);
CREATE INDEX records_session ON records (host_id, session) WHERE session IS NOT NULL;

CREATE TABLE checkpoints (
    host_id      text NOT NULL,
    seq          bigint NOT NULL,
    head         bytea NOT NULL,
    at_us        bigint NOT NULL,
    sig          bytea NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, seq, at_us)
);

CREATE TABLE findings (
    id        bigserial PRIMARY KEY,
    host_id   text NOT NULL,
    seq       bigint NOT NULL,
    problem   text NOT NULL,               -- gap, fork, unlinked, bad-checkpoint
    detail    text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (host_id, seq, problem)
);

CREATE TABLE refusals (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    peer          text NOT NULL,
    path          text NOT NULL,
    cert_subject  text,                    -- CN/OU of the client certificate, when one was shown
    claimed_host  text,
    status        integer NOT NULL,
    reason        text NOT NULL
);
CREATE INDEX refusals_at ON refusals (at);

-- Derived from session-open/session-close records (the latest record of a session wins).
CREATE TABLE sessions (
    host_id    text NOT NULL,
    id         text NOT NULL,
    agent      text, pid bigint, uid bigint, gid bigint, comm text, exe text, cmdline text,
    dst_addr   text, dst_port integer, family text, protocol text,
    started    double precision, ended double precision,
    bytes_up   bigint, bytes_down bigint,
    outcome    text, detail text, verdict text, rule text,
    last_seq   bigint NOT NULL,
    PRIMARY KEY (host_id, id)
);
CREATE INDEX sessions_started ON sessions (started);
CREATE INDEX sessions_agent ON sessions (agent, started);

-- Derived from approval records (the latest record of an approval wins).
CREATE TABLE approvals (
    host_id      text NOT NULL,
    id           text NOT NULL,
    created      double precision, session text, agent text, destination text, protocol text,
    action       text, objects text, summary text, rule text, reason text, timeout_at double precision,
    status       text, decided_by text, decided_at double precision, note text, grant_until double precision,
    last_seq     bigint NOT NULL,
    PRIMARY KEY (host_id, id)
);
CREATE INDEX approvals_status ON approvals (status, created);
