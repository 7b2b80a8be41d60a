"""Administration from the command line: teams and API keys.

    python -m app.admin create-team NAME
    python -m app.admin create-key TEAM_NAME [--name LABEL]    # prints the key, once
    python -m app.admin revoke-key PREFIX                      # the 8 characters after "gatt_"
    python -m app.admin list-keys TEAM_NAME

Uses GATT_DATABASE_URL like the service. Each command is one transaction.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.auth import service
from app.core.errors import AppError
from service.db import make_engine, make_sessionmaker, session_scope
from service.repositories import auth as repository
from service.settings import get_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.admin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-team", help="create a team")
    p.add_argument("name")
    p = commands.add_parser("create-key", help="create an API key for a team and print it (only time shown)")
    p.add_argument("team")
    p.add_argument("--name", default=None, help="a label for the key, e.g. 'ci'")
    p = commands.add_parser("revoke-key", help="revoke an API key by its prefix")
    p.add_argument("prefix")
    p = commands.add_parser("list-keys", help="list a team's keys (prefixes, never the keys)")
    p.add_argument("team")
    args = parser.parse_args(argv)

    engine = make_engine(get_settings())
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            if args.command == "create-team":
                team = service.create_team(session, args.name)
                print(f"created team {team.name!r} ({team.id})")
            elif args.command == "create-key":
                api_key, key = service.create_key(session, args.team, args.name)
                print(
                    f"created key {api_key.prefix} for team {args.team!r}; store it now, it is not shown again:"
                )
                print(key)
            elif args.command == "revoke-key":
                api_key = service.revoke_key(session, args.prefix)
                print(f"revoked key {api_key.prefix} (at {api_key.revoked_at:%Y-%m-%d %H:%M:%S %Z})")
            elif args.command == "list-keys":
                found = repository.get_team_by_name(session, args.team)
                if found is None:
                    raise AppError(f"No team named {args.team!r}.", code="not_found")
                for k in repository.list_keys(session, found.id):
                    state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                    print(f"{k.prefix}  {state:<18} {k.name or ''}")
    except AppError as e:
        print(f"error: {e.message} [{e.code}]", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
