"""Alembic environment: the URL comes from Settings (GATT_DATABASE_URL), the target schema from
service.models. Online mode only; offline SQL is `alembic upgrade head --sql` against the same metadata."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

import service.models  # noqa: F401  (registers every table on the metadata)
from service.models.base import Base
from service.settings import Settings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _url() -> str:
    # A URL given programmatically (tests: cfg.attributes["url"]) wins over the environment. Settings()
    # is built fresh, not the cached get_settings(), so the environment of this very run is honoured.
    return config.attributes.get("url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
