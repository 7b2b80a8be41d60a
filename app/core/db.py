"""The request-scoped unit of work: a session per request, committed when the endpoint returns.

Services and repositories never commit (`service.db`); for HTTP the owner of the transaction is
`get_session`: commit when the endpoint returns, roll back when it raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.db import session_scope
from service.settings import Settings


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(get_sessionmaker(request)) as session:
        yield session


# scope="function": the commit happens when the endpoint returns and before the response is sent, so
# a failed commit is answered with a 500 instead of a success the database never saw.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def get_request_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_request_settings)]
