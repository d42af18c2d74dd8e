-- i-web: which pending approvals were announced to the webhooks (one instance claims each), and
-- every delivery attempt (central/notify.py), with its outcome.
CREATE TABLE IF NOT EXISTS approval_notices (
    host        text NOT NULL,
    approval    text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, approval)
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id          bigserial PRIMARY KEY,
    host        text NOT NULL,
    approval    text NOT NULL,
    webhook     text NOT NULL,
    delivery_id text NOT NULL,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL,
    ok          boolean NOT NULL,
    status      integer,
    error       text,
    final       boolean NOT NULL,
    seconds     double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_approval ON webhook_deliveries (host, approval);
