"""Workload and person identities: OIDC tokens checked against their issuer (identity/oidc.py),
and the identities bound to agents (identity/agents.py). Imports nothing of proxy/ or
interceptor/, so the central recorder uses it too."""
