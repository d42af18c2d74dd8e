"""The approval page's configuration: `interlock recorder serve --web FILE` (YAML).

    origin: https://recorder.example:8443     # as approvers' browsers reach the recorder
    oidc:
      issuer: https://login.example.com       # discovery: issuer + /.well-known/openid-configuration
      client_id: interlock-approvals
      client_secret: ...                      # optional: a public client relies on PKCE alone
      groups_claim: groups                    # the ID token claim listing the approver's groups
      ca_file: /etc/ssl/idp-ca.pem            # optional: trust for the provider's TLS
    approvers:
      groups: [dba, oncall]                   # who may answer when a rule names none
      four_eyes: true                         # an agent's own owner may not answer its requests
    webhooks:                                 # told of each new pending approval (central/notify.py)
      - {name: ops, url: https://hooks.example/interlock, kind: json, secret: "..."}   # HMAC-SHA256 signed
      - {name: slack, url: https://hooks.slack.com/services/..., kind: slack}

The redirect URI to register at the provider is <origin>/ui/auth/callback.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from central.notify import Webhook
from central.web.app import WebSettings, session_key
from central.web.auth import ApproverRules
from central.web.oidc import OIDCSettings


class WebConfigError(ValueError):
    pass


def load(path: Path, state_dir: Path, prefix: str = "/ui") -> WebSettings:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise WebConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise WebConfigError(f"{path}: expected a mapping with origin, oidc, approvers")
    origin = str(raw.get("origin", "")).rstrip("/")
    u = urlsplit(origin)
    if u.scheme != "https" or not u.netloc or u.path:
        raise WebConfigError(f"{path}: origin must be https://HOST[:PORT] as browsers reach the recorder, got {origin!r}")
    o = raw.get("oidc")
    if not isinstance(o, dict) or not o.get("issuer") or not o.get("client_id"):
        raise WebConfigError(f"{path}: oidc needs issuer and client_id")
    a = raw.get("approvers") or {}
    if not isinstance(a, dict) or not isinstance(a.get("groups", []), list):
        raise WebConfigError(f"{path}: approvers must be a mapping with groups: [..] and four_eyes: true|false")
    unknown = set(raw) - {"origin", "oidc", "approvers", "webhooks"}
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {sorted(unknown)} (known: origin, oidc, approvers, webhooks)")
    hooks = []
    for i, w in enumerate(raw.get("webhooks") or []):
        try:
            hooks.append(Webhook(str(w["name"]), str(w["url"]), str(w.get("kind", "json")),
                                 str(w["secret"]).encode() if w.get("secret") else None))
        except (KeyError, TypeError, ValueError) as e:
            raise WebConfigError(f"{path}: webhooks[{i}]: {e} (each needs name, url, kind json|slack, secret for json)") from None
    oidc = OIDCSettings(issuer=str(o["issuer"]), client_id=str(o["client_id"]), redirect_uri=origin + prefix + "/auth/callback",
                        client_secret=str(o.get("client_secret") or ""), groups_claim=str(o.get("groups_claim") or "groups"),
                        ca_file=o.get("ca_file"))
    return WebSettings(oidc=oidc, origin=origin, session_key=session_key(state_dir),
                       rules=ApproverRules(groups=tuple(map(str, a.get("groups", []))), four_eyes=bool(a.get("four_eyes", True))),
                       webhooks=tuple(hooks))
