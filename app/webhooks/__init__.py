"""Webhook endpoints: signed notifications of job endings and checkpoints (docs/webhooks.md)."""
