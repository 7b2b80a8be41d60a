"""All SQL, one module per resource. Repositories never commit: whoever opened the session owns
the transaction (`service.db.session_scope`, or the API's request session)."""
