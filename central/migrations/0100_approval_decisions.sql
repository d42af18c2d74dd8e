-- i-web: the answers approvers give on the page, waiting for (then delivered to) their host.
-- One answer per held operation; the host applies it to its own store and ships the approval
-- record back, which is what the page and the replay show afterwards.
CREATE TABLE IF NOT EXISTS approval_decisions (
    host            text NOT NULL,
    approval        text NOT NULL,
    approve         boolean NOT NULL,
    for_seconds     double precision,
    note            text NOT NULL DEFAULT '',
    approver_sub    text NOT NULL,
    approver_email  text NOT NULL DEFAULT '',
    approver_issuer text NOT NULL,
    approver_label  text NOT NULL,
    decided_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    host_result     text,
    PRIMARY KEY (host, approval)
);
CREATE INDEX IF NOT EXISTS approval_decisions_undelivered ON approval_decisions (host) WHERE delivered_at IS NULL;
