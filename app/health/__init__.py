"""`/healthz` (the process answers) and `/readyz` (its dependencies answer too)."""
